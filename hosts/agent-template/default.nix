# @NAME@: an agent, scaffolded by `agentvm new @NAME@`. In a project with a
# users/ (or modules/users/) folder, `new` adds its agent-@NAME@.nix to imports.
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
