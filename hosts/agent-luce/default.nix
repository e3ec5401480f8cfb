# luce: an example agent, scaffolded like `agentvm new luce` would.
{ pkgs, ... }:

{
  imports = [ ../agent-base ];

  networking.hostName = "luce";
  agentvm.user = "luce";
  agentvm.desktop.enable = true;

  environment.systemPackages = with pkgs; [
    python3
  ];
}
