# @NAME@: an agent, scaffolded by `agentvm new @NAME@`.
{ pkgs, ... }:

{
  imports = [ ../agent-base ];

  networking.hostName = "@NAME@";
  agentvm.user = "@NAME@";

  environment.systemPackages = with pkgs; [
    git
    ripgrep
  ];
}
