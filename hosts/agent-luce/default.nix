# luce: an example agent, scaffolded like `agentvm new luce` would.
{ lib, pkgs, ... }:

{
  imports = [ ../agent-base ]
    ++ lib.optional (builtins.pathExists ./hardware-configuration.nix) ./hardware-configuration.nix;

  networking.hostName = "luce";
  agentvm.user = "luce";
  agentvm.desktop.enable = true;

  environment.systemPackages = with pkgs; [
    python3
  ];
}
