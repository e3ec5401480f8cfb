# drago: an example agent, scaffolded like `agentvm new drago` would.
{ lib, pkgs, ... }:

{
  imports = [ ../agent-base ]
    ++ lib.optional (builtins.pathExists ./hardware-configuration.nix) ./hardware-configuration.nix;

  networking.hostName = "drago";
  agentvm.user = "drago";

  environment.systemPackages = with pkgs; [
    git
    ripgrep
  ];
}
