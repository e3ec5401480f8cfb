# The base image: the common agent module, installed on a BIOS-bootable qcow2.
# `nix build .#agent-base-image` builds it.
{ config, lib, pkgs, modulesPath, ... }:

{
  imports = [ ../common/agent-base.nix ];

  networking.hostName = lib.mkDefault "agent-base";

  # agentvm boots SeaBIOS on q35 from a virtio disk.
  boot.loader.grub.device = "/dev/vda";

  system.build.agentvmImage = import "${modulesPath}/../lib/make-disk-image.nix" {
    inherit config lib pkgs;
    format = "qcow2";
    partitionTableType = "legacy";
    label = "nixos";
    diskSize = "auto";
    additionalSpace = "2048M";
    # Agents use flakes; a channel would only add a copy of nixpkgs.
    copyChannel = false;
  };
}
