{
  description = "agentvm: per-user agent VMs on libvirt, and the NixOS images they run";

  # nixos-26.05 is the current stable release. Its Rust (1.9x) is newer than
  # the 1.89 agentvm needs (let chains, sha2 0.11, uuid through virt), so the
  # package is built from the same nixpkgs as the hosts.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs = { self, nixpkgs, ... }:
    let
      system = "x86_64-linux";
      lib = nixpkgs.lib;

      # Every hosts/agent-* folder is a host, so the folder `agentvm new NAME`
      # writes is all a new agent needs (once git knows about it: flakes see
      # only tracked files). See hosts/discover.nix.
      hosts = import ./hosts/discover.nix ./hosts;

      packageOption = pkgs: lib.mkOption {
        type = lib.types.package;
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.default;
        defaultText = lib.literalExpression "agentvm.packages.\${pkgs.stdenv.hostPlatform.system}.default";
        description = "The agentvm package to run.";
      };

      # What the daemon runs besides itself: nix (flake images), ssh,
      # ssh-keyscan and ssh-keygen (openssh), qemu-img (QEMU), virtiofsd
      # (shared folders) and passt (port forwards without root, when present).
      daemonTools = { pkgs, nix, qemu }: [ nix qemu pkgs.openssh pkgs.passt pkgs.virtiofsd ];
    in
    {
      nixosConfigurations = lib.genAttrs hosts (name: lib.nixosSystem {
        inherit system;
        modules = [ (./hosts + "/${name}") ];
      });

      packages.${system} =
        let
          pkgs = nixpkgs.legacyPackages.${system};
        in
        {
          agentvm = pkgs.rustPlatform.buildRustPackage {
            pname = "agentvm";
            version = "0.1.0";
            # Only what the build reads, so that editing hosts/, the README or
            # the tests does not rebuild agentvm. benches/ is there because
            # Cargo.toml declares its [[bench]] targets, which cargo looks for
            # even when it does not build them. Nothing the build compiles
            # includes files from elsewhere (the one include_str!, of
            # hosts/agent-template, is in a unit test); xml/ and tests/ are read
            # by the tests only, which do not run here.
            src = lib.fileset.toSource {
              root = ./.;
              fileset = lib.fileset.unions [
                ./Cargo.toml
                ./Cargo.lock
                ./src
                ./benches
              ];
            };
            cargoLock.lockFile = ./Cargo.lock;
            nativeBuildInputs = [ pkgs.pkg-config ];
            buildInputs = [ pkgs.libvirt ];
            # The tests need libvirt and QEMU at run time, which the build
            # sandbox does not have.
            doCheck = false;
            meta.mainProgram = "agentvm";
          };
          default = self.packages.${system}.agentvm;
        }
        # agent-base-image, agent-drago-image, ...: the qcow2 of each host.
        // lib.mapAttrs'
          (name: host: lib.nameValuePair "${name}-image" host.config.system.build.agentvmImage)
          self.nixosConfigurations;

      # Runs `agentvm daemon` as a systemd user service for every user.
      #
      # A user's services, and so the VMs the daemon started, stop when the
      # user's last session ends. For VMs that keep running without anyone
      # logged in, let the user's manager linger: `loginctl enable-linger
      # USER`, or `users.users.USER.linger = true` in the configuration.
      nixosModules.agentvm-daemon = { config, lib, pkgs, ... }:
        let
          cfg = config.services.agentvm;
        in
        {
          options.services.agentvm = {
            enable = lib.mkEnableOption "the agentvm daemon (a systemd user service) and libvirt";
            package = packageOption pkgs;
          };

          config = lib.mkIf cfg.enable {
            virtualisation.libvirtd.enable = true;
            environment.systemPackages = [ cfg.package ];

            systemd.user.services.agentvm-daemon = {
              description = "agentvm daemon";
              wantedBy = [ "default.target" ];
              # User services get no PATH from the system.
              path = daemonTools {
                inherit pkgs;
                nix = config.nix.package;
                qemu = config.virtualisation.libvirtd.qemu.package;
              };
              serviceConfig = {
                ExecStart = "${cfg.package}/bin/agentvm daemon --idle-exit off";
                Restart = "on-failure";
              };
            };
          };
        };

      # The same user service for home-manager, on NixOS or any other
      # distribution (libvirt itself comes from the system there). Lingering
      # applies as for the NixOS module: `loginctl enable-linger USER`.
      homeManagerModules.agentvm = { config, lib, pkgs, ... }:
        let
          cfg = config.services.agentvm;
          tools = lib.makeBinPath (daemonTools {
            inherit pkgs;
            # home-manager's nix.package is null unless the user sets it.
            nix = if config.nix.package or null != null then config.nix.package else pkgs.nix;
            qemu = pkgs.qemu;
          });
        in
        {
          options.services.agentvm = {
            enable = lib.mkEnableOption "the agentvm daemon as a systemd user service";
            package = packageOption pkgs;
          };

          config = lib.mkIf cfg.enable {
            home.packages = [ cfg.package ];

            systemd.user.services.agentvm-daemon = {
              Unit.Description = "agentvm daemon";
              Service = {
                ExecStart = "${cfg.package}/bin/agentvm daemon --idle-exit off";
                Restart = "on-failure";
                # User services get no PATH from the system: the tools first,
                # then the system's own directories.
                Environment = [ "PATH=${tools}:/run/current-system/sw/bin:/usr/bin:/bin" ];
              };
              Install.WantedBy = [ "default.target" ];
            };
          };
        };
      # The name this module had first.
      homeManagerModules.agentvm-daemon = self.homeManagerModules.agentvm;
    };
}
