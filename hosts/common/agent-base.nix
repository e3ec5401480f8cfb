# What every agent VM runs: guest agent, SSH, serial console, a root disk that
# grows to the size of its overlay, and the credentials agentvm passes in.
{ config, lib, pkgs, modulesPath, ... }:

let
  cfg = config.agentvm;
  home = config.users.users.${cfg.user}.home;
  group = config.users.users.${cfg.user}.group;

  # Publishes the VM's env: the agentvm.env credential when there is one,
  # else /etc/agentvm/env (root's, in a root-only folder). With --changed
  # (run when /etc/agentvm/env was written) it first waits for the file to
  # stop changing. Running user managers get the new values.
  publishEnv = pkgs.writeShellScript "agentvm-publish-env" ''
    set -eu
    export PATH=${lib.makeBinPath [ pkgs.coreutils pkgs.gnused pkgs.gnugrep pkgs.diffutils pkgs.util-linux config.systemd.package ]}

    credential=''${CREDENTIALS_DIRECTORY:-/run/credentials/@system}/agentvm.env
    file=/etc/agentvm/env
    out=/run/agentvm
    changed=
    [ "''${1-}" = --changed ] && changed=1

    # The source to publish: the credential wins; /etc/agentvm/env only
    # counts when root owns it (its folder is root's alone, 0700).
    pick_source() {
      source=
      if [ -f "$credential" ]; then
        source=$credential
      elif [ -f "$file" ]; then
        if [ "$(stat -c %u "$file")" = 0 ]; then
          source=$file
        else
          echo "publish-env: $file is not owned by root; ignored" >&2
        fi
      fi
    }

    # The names in a KEY=VALUE file, one a line.
    keys_of() {
      sed -n 's/^\([A-Za-z_][A-Za-z0-9_]*\)=.*$/\1/p' "$1" 2>/dev/null || true
    }

    # Runs systemctl --user as user $uid (group $gid), in that user's manager.
    as_user() {
      setpriv --reuid="$uid" --regid="$gid" --clear-groups \
        env XDG_RUNTIME_DIR="/run/user/$uid" systemctl --user "$@"
    }

    # Sets the published variables in every running user manager and unsets
    # (or empties) those in $1 (names) that are no longer published. Each
    # line becomes one argument of systemctl: nothing is evaluated by a shell.
    push_to_user_managers() {
      # No user has a runtime folder, so no manager runs (as at boot).
      for dir in /run/user/[0-9]*; do
        [ -d "$dir" ] && break
        return 0
      done
      gone=
      for key in $1; do
        grep -q "^$key=" "$out/env" 2>/dev/null || gone="$gone $key"
      done
      set --
      if [ -f "$out/env" ]; then
        while IFS= read -r line || [ -n "$line" ]; do
          case ''${line%%=*} in
            "" | [0-9]* | *[!A-Za-z0-9_]*) ;;
            *) case $line in *=*) set -- "$@" "$line" ;; esac ;;
          esac
        done <"$out/env"
      fi
      uids=$(systemctl list-units --plain --no-legend --state=active 'user@*.service' |
        sed -n 's/^user@\([0-9][0-9]*\)\.service .*/\1/p')
      for uid in $uids; do
        gid=$(id -g "$uid") || continue
        emptied=
        if [ -n "$gone" ]; then
          # names only: [A-Za-z0-9_]
          as_user unset-environment $gone ||
            echo "publish-env: could not unset variables in the manager of UID $uid" >&2
          # What the manager had from its start (EnvironmentFile=) cannot
          # be unset: set it empty instead.
          effective=$(as_user show-environment 2>/dev/null) || effective=
          for key in $gone; do
            printf '%s\n' "$effective" | grep -q "^$key=" && emptied="$emptied $key="
          done
        fi
        if [ $# -gt 0 ] || [ -n "$emptied" ]; then
          # KEY= only
          as_user set-environment "$@" $emptied ||
            echo "publish-env: could not set the env in the manager of UID $uid" >&2
        fi
      done
    }

    umask 077
    install -d -m 0755 "$out"
    while :; do
      pick_source
      old_keys=$(keys_of "$out/env")
      if [ -z "$source" ]; then
        rm -f "$out/env" "$out/env.systemd"
      else
        if [ "$source" = "$file" ] && [ "$(stat -c %a "$file")" != 600 ]; then
          # qemu-ga creates files 0666; the 0700 folder keeps them private
          # anyway.
          chmod 0600 "$file" 2>/dev/null || true
        fi
        cat -- "$source" >"$out/env.new" 2>/dev/null || : >"$out/env.new"
        if [ -n "$changed" ] && [ "$source" = "$file" ]; then
          # The guest agent creates, writes and closes the file in separate
          # steps, and the .path unit does not watch it while this runs:
          # wait until it has stayed the same for half a second.
          while sleep 0.5 && [ -f "$file" ] && ! cmp -s "$file" "$out/env.new"; do
            cat -- "$file" >"$out/env.new" 2>/dev/null || : >"$out/env.new"
          done
        fi
        chmod 0600 "$out/env.new"
        chown ${cfg.user} "$out/env.new"
        mv "$out/env.new" "$out/env"
        # EnvironmentFile= unquotes and unescapes: quote each value and
        # escape \ " ` $ so that it arrives exactly as written.
        sed -e 's/[\\"`$]/\\&/g' -e 's/^\([A-Za-z_][A-Za-z0-9_]*\)=\(.*\)$/\1="\2"/' \
          "$out/env" >"$out/env.systemd.tmp"
        chown ${cfg.user} "$out/env.systemd.tmp"
        mv "$out/env.systemd.tmp" "$out/env.systemd"
      fi
      push_to_user_managers "$old_keys"
      # Written again while this ran: publish that too.
      if [ -n "$changed" ] && [ "$source" = "$file" ] && ! cmp -s "$file" "$out/env"; then
        continue
      fi
      break
    done
  '';
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
      # Defaults, so a host's own file system definition (say, from a full
      # nixos-generate-config) takes over without a conflict.
      fileSystems."/" = {
        device = lib.mkDefault "/dev/disk/by-label/nixos";
        fsType = lib.mkDefault "ext4";
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
        # Where the host writes the env when there is no credential (on
        # Proxmox, through the guest agent, which may create the file 0644).
        "d /etc/agentvm 0700 root root -"
      ];

      # systemd (PID 1) imports credentials from QEMU's fw_cfg, where agentvm
      # puts the env so that no command line carries it; the module has to be
      # loaded before PID 1 starts, so it is loaded in the initrd.
      boot.initrd.kernelModules = [ "qemu_fw_cfg" ];

      # The VM's `env` table (with its pass_env values, often API keys):
      # KEY=VALUE lines, values literal. Local VMs get it as the credential
      # agentvm.env (fw_cfg); on Proxmox the host writes /etc/agentvm/env
      # through the guest agent once the guest has booted (and again while
      # it runs), and the credential wins when both exist. It is published
      # for the user only (0600): /run/agentvm/env as it is, for shells, and
      # /run/agentvm/env.systemd quoted for EnvironmentFile=, for the user's
      # systemd manager and so every service the user starts. It is
      # published at boot and again whenever /etc/agentvm/env is written;
      # user managers that already run get the new values then. Commands
      # run by `agentvm exec` get the env from the host through the guest
      # agent. images/debian/rootfs/common/usr/local/lib/agentvm/publish-env
      # is the same script for Debian.
      systemd.services.agentvm-env = {
        description = "Publish the VM's env to the agent user";
        wantedBy = [ "multi-user.target" ];
        before = [ "systemd-user-sessions.service" ];
        serviceConfig = {
          Type = "oneshot";
          RemainAfterExit = true;
          ImportCredential = "agentvm.env";
          ExecStart = "${publishEnv}";
        };
      };

      # The host may write /etc/agentvm/env at any time after boot.
      systemd.paths.agentvm-env = {
        description = "Watch /etc/agentvm/env for the VM's env";
        wantedBy = [ "paths.target" ];
        pathConfig = {
          PathChanged = "/etc/agentvm/env";
          Unit = "agentvm-env-update.service";
        };
      };
      # Not RemainAfterExit: the path unit starts it again on the next change.
      systemd.services.agentvm-env-update = {
        description = "Publish the VM's env again after /etc/agentvm/env changed";
        after = [ "agentvm-env.service" ];
        serviceConfig = {
          Type = "oneshot";
          ImportCredential = "agentvm.env";
          ExecStart = "${publishEnv} --changed";
        };
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
      # Since nixos-25.11 GDM and GNOME are no longer under services.xserver.
      services.xserver.enable = true;
      services.displayManager.gdm.enable = true;
      services.desktopManager.gnome.enable = true;

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
