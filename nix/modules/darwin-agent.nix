# services.nixfleet-agent for nix-darwin: the agent (SPEC.md §7) as the launchd daemon
# org.nixos.nixfleet-agent, run as root, activating nix-darwin closures (`activate`).
#
# The option tree is the NixOS module's (./agent.nix), taken from it rather than copied,
# so that one fleet's `services.nixfleet-agent` settings work on both; only `activation`
# defaults to "darwin" here (as the binary does on macOS) and the descriptions that name
# systemd say what happens on macOS instead. The command line comes from the same flag
# rendering (./cli.nix), as ProgramArguments. crates/nixfleet-cli/tests/packaging.rs
# checks it against the binary's --help. docs/darwin.md tells how to use it.
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
  label = "org.nixos.nixfleet-agent";

  # The NixOS module's options: every flag of the binary (plus enable, package, logLevel).
  shared = (import ./agent.nix { inherit config lib pkgs; }).options.services.nixfleet-agent;
  notFlags = [
    "enable"
    "package"
    "logLevel"
    "compliance"
  ];
  flagNames = builtins.filter (name: !(builtins.elem name notFlags)) (builtins.attrNames shared);

  options =
    shared
    // {
      activation = mkOption {
        type = types.enum [
          "darwin"
          "nixos"
        ];
        default = "darwin";
        description = "How targets are activated: darwin runs the nix-darwin closure's `activate`.";
      };
      healthCommand = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = ''A shell command printing `{"failedUnits": N}`; null counts the org.nixos.* launchd jobs that are not running and last exited non-zero (`launchctl list`).'';
      };
      switchLock = mkOption {
        type = types.strMatching "/.*";
        default = "/run/nixos/switch-to-configuration.lock";
        description = "Unused by the darwin backend (nix-darwin has no activation lock); kept so that the option tree is the NixOS module's.";
      };
    };

  args = cli.toArgs {
    names = flagNames;
    inherit cfg;
    renamed.substituters = "--substituter";
  };

  # Nix of a nix-darwin-managed install (/run/current-system/sw/bin), of the official and
  # the Determinate installers (/nix/var/nix/profiles/default/bin; Determinate also links
  # its tools into /usr/local/bin); launchctl, ps and sysctl from the base system.
  path = lib.concatStringsSep ":" [
    "/run/current-system/sw/bin"
    "/nix/var/nix/profiles/default/bin"
    "/usr/local/bin"
    "/usr/bin"
    "/bin"
    "/usr/sbin"
    "/sbin"
  ];

  trustWritten = trust.ciReleaseKey != null && trust.orgRootKey != null;

  # As in ./agent.nix: the defaults again, for evaluations that do not merge submodules.
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

  options.services.nixfleet-agent = options;

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = (trust.ciReleaseKey == null) == (trust.orgRootKey == null);
        message = "nixfleet.trust: set both ciReleaseKey and orgRootKey (trust.json is written from them), or neither (then provide ${toString cfg.trustFile} yourself).";
      }
    ];

    # nix-darwin links /etc files to the store: read-only and owned by root, which the
    # agent's check (not writable by group or others) accepts.
    environment.etc."nixfleet/agent/trust.json" = lib.mkIf trustWritten {
      text = cli.trustJson trust;
    };

    # The probe set, in the closure (<system>/etc/nixfleet/compliance.json) as on NixOS.
    environment.etc."nixfleet/compliance.json" = lib.mkIf complianceOn {
      text = builtins.toJSON {
        inherit (compliance) mode frameworks;
        probes = compliance.library.probesFor (compliance.library.controlsFor compliance.frameworks);
      };
    };

    # Before launchd (re)starts the daemon: its state directory, private to root.
    system.activationScripts.preActivation.text = ''
      mkdir -p ${lib.escapeShellArg cfg.stateDir}
      chmod 0700 ${lib.escapeShellArg cfg.stateDir}
      mkdir -p ${etcDir}
    '';

    # A restart after each activation, so that a new agent takes over. When the agent
    # itself runs `activate`, this kills it mid-wait; the new agent finds the run's
    # directory and waits for the recorded outcome (the crash-recovery path).
    system.activationScripts.postActivation.text = ''
      /bin/launchctl kickstart -k system/${label} 2>/dev/null || true
    '';

    launchd.daemons.nixfleet-agent = {
      serviceConfig = {
        Label = label;
        ProgramArguments = [ (lib.getExe cfg.package) ] ++ args;
        RunAtLoad = true;
        # The agent is the host's only way back to its fleet: always bring it back.
        KeepAlive = true;
        ThrottleInterval = 5;
        # launchd signals the job's process group when it stops the job; the activation
        # runs in a group of its own, and must outlive the agent all the same.
        AbandonProcessGroup = true;
        ProcessType = "Interactive";
        Umask = 63; # 0077
        StandardOutPath = "/var/log/nixfleet-agent.log";
        StandardErrorPath = "/var/log/nixfleet-agent.log";
        EnvironmentVariables = {
          PATH = path;
        }
        // lib.optionalAttrs (cfg.logLevel != null) { NIXFLEET_LOG = cfg.logLevel; };
      };
    };
  };
}
