# drago: an example agent, scaffolded like `agentvm new drago` would.
{ pkgs, ... }:

{
  imports = [ ../agent-base ];

  networking.hostName = "drago";
  agentvm.user = "drago";

  environment.systemPackages = with pkgs; [
    git
    ripgrep
  ];
}
