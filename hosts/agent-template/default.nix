# @NAME@: an agent, scaffolded by `agentvm new @NAME@`. In a project with a
# users/ (or modules/users/) folder, `new` adds its agent-@NAME@.nix to imports.
# `agentvm deploy @NAME@` writes ./hardware-configuration.nix (from the VM's own
# nixos-generate-config) when it is missing; it is imported once it exists.
{ lib, pkgs, ... }:

{
  imports = [ ../agent-base ]
    ++ lib.optional (builtins.pathExists ./hardware-configuration.nix) ./hardware-configuration.nix;

  networking.hostName = "@NAME@";
  agentvm.user = "@NAME@";

  environment.systemPackages = with pkgs; [
    git
    ripgrep
  ];
}
