# services.nixfleet-agent: the agent (SPEC.md §7) as nixfleet-agent.service. It runs as
# root: it realises closures, sets the system profile and switches the system.
#
# Every flag of `nixfleet-agent` is an option of the same name in camelCase (--state-dir
# is stateDir; the repeatable --substituter is the list `substituters`) with the binary's
# default; options left null are not passed. packaging/systemd/nixfleet-agent.service is
# the same unit for other systems, and crates/nixfleet-cli/tests/packaging.rs checks both
# against the binary's --help.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;
  cli = import ./cli.nix;
  cfg = config.services.nixfleet-agent;
  trust = config.nixfleet.trust;

  etcDir = "/etc/nixfleet/agent";

  # Files that must stay off the store are strings: a path literal would be copied into
  # the world-readable Nix store.
  absolute = types.strMatching "/.*";

  # The binary's flags, as mkOption arguments.
  flagOptions = {
    controlPlaneUrl = {
      type = types.str;
      example = "https://cp.example.org:8443";
      description = "Base URL of the control plane.";
    };
    hostname = {
      type = types.nullOr types.str;
      default = null;
      description = "This host's name in the fleet; null lets the agent use the system hostname.";
    };
    trustFile = {
      type = types.path;
      default = "${etcDir}/trust.json";
      description = "trust.json with the pinned roots; written from {option}`nixfleet.trust` when that is set.";
    };
    stateDir = {
      type = absolute;
      default = "/var/lib/nixfleet-agent";
      description = "Where the agent keeps its certificate, state machine, cached manifests and unsent reports.";
    };
    hostKey = {
      type = absolute;
      default = "/etc/ssh/ssh_host_ed25519_key";
      description = "The host SSH ed25519 key: the TLS client key, and the key that signs the CSR and reports.";
    };
    caCert = {
      type = types.path;
      default = "${etcDir}/ca.pem";
      description = "The fleet CA certificate that the control plane's server certificate chains to (public: a path in the flake is fine).";
    };
    bootstrapTokenFile = {
      type = types.nullOr absolute;
      default = null;
      description = "A bootstrap token from `nixfleet mint-token`, used when the agent has no valid certificate. Keep it out of the store.";
    };
    activation = {
      type = types.enum [ "nixos" ];
      default = "nixos";
      description = "How targets are activated.";
    };
    profile = {
      type = absolute;
      default = "/nix/var/nix/profiles/system";
      description = "The system profile that `nix-env --set` points at the target.";
    };
    currentSystemLink = {
      type = absolute;
      default = "/run/current-system";
      description = "The link to the running system; its target is the current closure.";
    };
    healthCommand = {
      type = types.nullOr types.str;
      default = null;
      description = ''A shell command printing `{"failedUnits": N}`; null counts `systemctl --failed`.'';
    };
    substituters = {
      type = types.listOf types.str;
      default = [ ];
      example = [ "https://cache.example.org" ];
      description = "Binary caches to realise closures from (one --substituter each). Closures must be signed by one of {option}`nixfleet.trust.cacheKeys`.";
    };
    pollIntervalSecs = {
      type = types.ints.positive;
      default = 60;
      description = "Longest wait between check-ins, seconds; also the cap of the error backoff.";
    };
    requestTimeoutSecs = {
      type = types.ints.positive;
      default = 30;
      description = "Timeout of each request to the control plane, seconds.";
    };
    realiseTimeoutSecs = {
      type = types.ints.positive;
      default = 3600;
      description = "Timeout of `nix-store --realise`, seconds.";
    };
    switchTimeoutSecs = {
      type = types.ints.positive;
      default = 900;
      description = "How long switch-to-configuration may run before it counts as failed, seconds.";
    };
    switchLock = {
      type = absolute;
      default = "/run/nixos/switch-to-configuration.lock";
      description = "The lock switch-to-configuration holds while it runs; activation waits while someone else holds it.";
    };
    complianceIntervalSecs = {
      type = types.ints.unsigned;
      default = 3600;
      description = "Between rollouts, run the running closure's compliance probes again this often (drift), seconds; 0 disables drift runs.";
    };
  };

  args = cli.toArgs {
    names = builtins.attrNames flagOptions;
    inherit cfg;
    renamed.substituters = "--substituter";
  };

  trustWritten = trust.ciReleaseKey != null && trust.orgRootKey != null;

  # The options' defaults again, for evaluations that do not merge submodules (the
  # option tests in crates/nixfleet-cli/tests/packaging.rs); a no-op under NixOS.
  compliance = {
    frameworks = [ ];
    mode = "disabled";
    library = import ../lib/compliance;
  }
  // cfg.compliance;
  complianceOn = compliance.mode != "disabled" && compliance.frameworks != [ ];
in
{
  imports = [ ./trust.nix ];

  options.services.nixfleet-agent = {
    enable = lib.mkEnableOption "the nixfleet agent";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../package.nix {
        crate = "nixfleet-agent";
        mainProgram = "nixfleet-agent";
      };
      defaultText = lib.literalExpression "nixfleet-agent built from this flake's source with pkgs.rustPlatform";
      description = "The package providing `bin/nixfleet-agent`.";
    };

    logLevel = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "debug";
      description = "Log filter (`NIXFLEET_LOG`, tracing's EnvFilter syntax); the binary logs at info by default.";
    };

    # Not a flag: the probe set the closure carries, /etc/nixfleet/compliance.json
    # (nixfleet_proto::compliance::ProbeSet), which the agent runs after activation.
    compliance = mkOption {
      type = types.submodule {
        options = {
          frameworks = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [ "cis" "nis2" ];
            description = "The frameworks of this host's channel (its `compliance.frameworks` in mkFleet).";
          };
          mode = mkOption {
            type = types.enum [
              "enforce"
              "permissive"
              "disabled"
            ];
            default = "disabled";
            description = "The compliance mode of this host's channel (its `compliance.mode` in mkFleet). With disabled, or no frameworks, no probe set is written.";
          };
          library = mkOption {
            type = types.raw;
            default = import ../lib/compliance;
            defaultText = lib.literalExpression "nixfleet's lib.compliance";
            description = "The compliance library whose controls' probes are written: the fleet's (`fleet.compliance`, the one mkFleet got) when it adds controls.";
          };
        };
      };
      default = { };
      description = "The channel's compliance, as in mkFleet: the probes of its frameworks' controls go into /etc/nixfleet/compliance.json for the agent to run after activation.";
    };
  }
  // lib.mapAttrs (_: mkOption) flagOptions;

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (trust.ciReleaseKey == null) == (trust.orgRootKey == null);
        message = "nixfleet.trust: set both ciReleaseKey and orgRootKey (trust.json is written from them), or neither (then provide ${toString cfg.trustFile} yourself).";
      }
    ];

    warnings = lib.optional (trustWritten && toString cfg.trustFile != "${etcDir}/trust.json") "services.nixfleet-agent.trustFile is ${toString cfg.trustFile}, so the trust.json written from nixfleet.trust to ${etcDir}/trust.json is not used.";

    # A copy, not a store symlink, with the mode the binary insists on (not writable by
    # group or others).
    environment.etc."nixfleet/agent/trust.json" = lib.mkIf trustWritten {
      text = cli.trustJson trust;
      mode = "0644";
    };

    # Inside the closure CI signed (<toplevel>/etc/nixfleet/compliance.json), so the
    # control plane cannot change which probes run.
    environment.etc."nixfleet/compliance.json" = lib.mkIf complianceOn {
      text = builtins.toJSON {
        inherit (compliance) mode frameworks;
        probes = compliance.library.probesFor (compliance.library.controlsFor compliance.frameworks);
      };
    };

    systemd.services.nixfleet-agent = {
      description = "nixfleet agent";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [
        "network-online.target"
        "nix-daemon.socket"
      ];
      # The agent drives switch-to-configuration and waits to confirm it; the switch must
      # not restart (kill) it halfway. A new agent takes over at the next restart or boot.
      restartIfChanged = false;
      # nix-store and nix-env; systemd-run and systemctl are on every unit's PATH.
      path = [ config.nix.package ];
      environment = lib.optionalAttrs (cfg.logLevel != null) { NIXFLEET_LOG = cfg.logLevel; };

      serviceConfig = {
        Type = "exec";
        ExecStart = cli.command (lib.getExe cfg.package) args;
        # The agent is the host's only way back to its fleet: always bring it back.
        Restart = "always";
        RestartSec = "5s";
        KillSignal = "SIGTERM";
        StateDirectory = "nixfleet-agent";
        StateDirectoryMode = "0700";
        UMask = "0077";

        # No ProtectSystem=strict (nor ProtectHome, RestrictNamespaces, SystemCallFilter,
        # a capability bound): the agent installs systems. nix-store writes the store
        # (remounting it read-write in a mount namespace of its own, and caching under
        # /root), nix-env writes the system profile, and both run inside this unit; the
        # switch itself runs in a transient unit of its own (systemd-run). What follows
        # takes away only what none of that uses.
        NoNewPrivileges = true;
        PrivateTmp = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
          "AF_NETLINK"
        ];
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
      };
    };
  };
}
