# What every agent VM runs: guest agent, SSH, serial console, a root disk that
# grows to the size of its overlay, and the credentials agentvm passes in.
{ config, lib, pkgs, modulesPath, ... }:

let
  cfg = config.agentvm;
  home = config.users.users.${cfg.user}.home;
  group = config.users.users.${cfg.user}.group;
in
{
  imports = [ (modulesPath + "/profiles/qemu-guest.nix") ];

  options.agentvm = {
    user = lib.mkOption {
      type = lib.types.str;
      default = "agent";
      description = "The normal (wheel) user agents work as.";
    };

    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "SSH public keys for the user, on top of the ones the host passes at boot.";
    };

    desktop.enable = lib.mkEnableOption "a GNOME desktop, logged in as the user and reachable over SPICE";

    tailscale.enable = lib.mkEnableOption "Tailscale";
  };

  config = lib.mkMerge [
    {
      services.qemuGuest.enable = true;

      services.openssh = {
        enable = true;
        settings = {
          PasswordAuthentication = false;
          KbdInteractiveAuthentication = false;
          PermitRootLogin = "prohibit-password";
        };
      };

      # The last console= is /dev/console, so systemd's boot messages end up in
      # the serial log that `agentvm console` follows.
      boot.kernelParams = [ "console=tty0" "console=ttyS0,115200" ];

      boot.growPartition = true;
      fileSystems."/" = {
        device = "/dev/disk/by-label/nixos";
        fsType = "ext4";
        autoResize = true;
      };

      nix.settings.experimental-features = [ "nix-command" "flakes" ];

      users.users.${cfg.user} = {
        isNormalUser = true;
        extraGroups = [ "wheel" ];
        openssh.authorizedKeys.keys = cfg.authorizedKeys;
      };
      security.sudo.wheelNeedsPassword = false;

      # systemd imports the host's SMBIOS type 11 strings as system credentials,
      # and systemd-tmpfiles-setup.service imports ssh.authorized_keys.root.
      # `f+` rewrites the files on every boot, so a changed key list in
      # agentvm.toml reaches an existing disk; without the credential the lines
      # are skipped. Keys that must stay go in agentvm.authorizedKeys.
      systemd.tmpfiles.rules = [
        "d /root/.ssh 0700 root root -"
        "f+^ /root/.ssh/authorized_keys 0600 root root - ssh.authorized_keys.root"
        "d ${home}/.ssh 0700 ${cfg.user} ${group} -"
        "f+^ ${home}/.ssh/authorized_keys 0600 ${cfg.user} ${group} - ssh.authorized_keys.root"
      ];

      # systemd (PID 1) imports credentials from QEMU's fw_cfg, where agentvm
      # puts the env so that no command line carries it; the module has to be
      # loaded before PID 1 starts, so it is loaded in the initrd.
      boot.initrd.kernelModules = [ "qemu_fw_cfg" ];

      # The VM's `env` table (with its pass_env values, often API keys) arrives
      # as the credential agentvm.env: KEY=VALUE lines. It is published for
      # the user only (0600): /run/agentvm/env as it is, for shells, and
      # /run/agentvm/env.systemd quoted for EnvironmentFile=, for the user's
      # systemd manager and so every service the user starts. Commands run by
      # `agentvm exec` get the env from the host through the guest agent.
      systemd.services.agentvm-env = {
        description = "Publish the agentvm.env credential to the agent user";
        wantedBy = [ "multi-user.target" ];
        before = [ "systemd-user-sessions.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ImportCredential = "agentvm.env";
        };
        path = [ pkgs.coreutils pkgs.gnused ];
        script = ''
          rm -f /run/agentvm/env /run/agentvm/env.systemd
          if [ -f "$CREDENTIALS_DIRECTORY/agentvm.env" ]; then
            install -d -m 0755 /run/agentvm
            install -m 0600 -o ${cfg.user} "$CREDENTIALS_DIRECTORY/agentvm.env" /run/agentvm/env
            # EnvironmentFile= unquotes and unescapes: quote each value and
            # escape \ " ` $ so that it arrives exactly as written.
            sed -e 's/[\\"`$]/\\&/g' -e 's/^\([A-Za-z_][A-Za-z0-9_]*\)=\(.*\)$/\1="\2"/' \
              /run/agentvm/env > /run/agentvm/env.systemd.tmp
            chmod 0600 /run/agentvm/env.systemd.tmp
            mv /run/agentvm/env.systemd.tmp /run/agentvm/env.systemd
          fi
        '';
      };

      # The user's systemd manager passes its environment to the services it
      # starts (lingering managers included).
      systemd.services."user@" = {
        after = [ "agentvm-env.service" ];
        serviceConfig.EnvironmentFile = "-/run/agentvm/env.systemd";
      };

      # Every shell, login or not (NixOS's bash reads /etc/bashrc for commands
      # run over SSH too). Values are literal text, not shell syntax, so each
      # line is exported as it is rather than sourced.
      environment.extraInit = ''
        if [ -r /run/agentvm/env ]; then
          while IFS= read -r __agentvm_line || [ -n "$__agentvm_line" ]; do
            case "$__agentvm_line" in
              [A-Za-z_]*=*) export "$__agentvm_line" ;;
            esac
          done < /run/agentvm/env
          unset __agentvm_line
        fi
      '';

      system.stateVersion = lib.mkDefault "25.05";
    }

    (lib.mkIf cfg.desktop.enable {
      # nixos-25.05 keeps GDM and GNOME under services.xserver; later releases
      # move them to services.displayManager.gdm and services.desktopManager.gnome
      # and keep these names as aliases.
      services.xserver.enable = true;
      services.xserver.displayManager.gdm.enable = true;
      services.xserver.desktopManager.gnome.enable = true;

      # The user has no password, so the desktop logs it in.
      services.displayManager.autoLogin = {
        enable = true;
        user = cfg.user;
      };
      # GNOME's autologin session fails while a getty holds tty1.
      systemd.services."getty@tty1".enable = false;
      systemd.services."autovt@tty1".enable = false;

      services.spice-vdagentd.enable = true;
    })

    (lib.mkIf cfg.tailscale.enable {
      services.tailscale.enable = true;
    })
  ];
}
