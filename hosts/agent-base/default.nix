# The base image: the common agent module, installed on a BIOS-bootable qcow2.
# `nix build .#agent-base-image` builds it.
{ config, lib, pkgs, modulesPath, ... }:

{
  imports = [ ../common/agent-base.nix ];

  networking.hostName = lib.mkDefault "agent-base";

  # agentvm boots SeaBIOS on q35 from a virtio disk.
  boot.loader.grub.device = "/dev/vda";

  # The image: the qcow2 (bootable through GRUB) and, beside it,
  # agentvm-boot.json naming this system's kernel, initrd and kernel command
  # line, so agentvm boots a new VM directly without the bootloader. Once
  # `agentvm provision` has switched a VM to another system, agentvm boots
  # that VM through GRUB, which knows the new generation.
  system.build.agentvmImage =
    let
      disk = import "${modulesPath}/../lib/make-disk-image.nix" {
        inherit config lib pkgs;
        format = "qcow2";
        partitionTableType = "legacy";
        label = "nixos";
        diskSize = "auto";
        additionalSpace = "2048M";
        # Agents use flakes; a channel would only add a copy of nixpkgs.
        copyChannel = false;
      };
      system = config.system.build.toplevel;
      boot = pkgs.writeText "agentvm-boot.json" (builtins.toJSON {
        kernel = "${system}/kernel";
        initrd = "${system}/initrd";
        cmdline = lib.concatStringsSep " " ([ "init=${system}/init" ] ++ config.boot.kernelParams);
      });
    in
    pkgs.runCommand "agentvm-image-${config.networking.hostName}" { } ''
      mkdir -p $out
      ln -s ${disk}/nixos.qcow2 $out/nixos.qcow2
      ln -s ${boot} $out/agentvm-boot.json
    '';
}
