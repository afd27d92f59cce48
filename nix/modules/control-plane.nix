# services.nixfleet-control-plane: the control plane (SPEC.md §5) as a hardened systemd
# service, nixfleet-control-plane.service.
#
# Every flag of `nixfleet-control-plane` is an option of the same name in camelCase
# (--db-path is dbPath) with the binary's default; options left null are not passed.
# packaging/systemd/nixfleet-control-plane.service is the same unit for other systems, and
# crates/nixfleet-cli/tests/packaging.rs checks both against the binary's --help.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (lib) mkOption types;
  cli = import ./cli.nix;
  cfg = config.services.nixfleet-control-plane;
  trust = config.nixfleet.trust;

  unit = "nixfleet-control-plane.service";
  stateDir = "/var/lib/nixfleet-cp";
  etcDir = "/etc/nixfleet/cp";

  # Files that must stay off the store are strings: a path literal would be copied into
  # the world-readable Nix store.
  absolute = types.strMatching "/.*";

  # The binary's flags, as mkOption arguments.
  flagOptions = {
    listen = {
      type = types.str;
      default = "0.0.0.0:8443";
      description = "Address to listen on (HTTPS; client certificates are checked per route).";
    };
    dbPath = {
      type = absolute;
      default = "${stateDir}/state.db";
      description = "SQLite database (WAL). Everything in it can be rebuilt from signed artifacts and agent check-ins.";
    };
    databaseUrl = {
      type = types.nullOr types.str;
      default = null;
      example = "postgres://nixfleet@db.example.org:5432/nixfleet";
      description = "PostgreSQL shared by control-plane replicas; set, {option}`dbPath` is not used and the replicas elect a leader (docs/high-availability.md). It ends up in the world-readable store: give the password with {option}`databasePasswordFile`, not in the URL.";
    };
    databasePasswordFile = {
      type = types.nullOr absolute;
      default = null;
      example = "/etc/nixfleet/cp/database-password";
      description = "File holding the PostgreSQL password, handed over as a credential.";
    };
    databaseCaFile = {
      type = types.nullOr types.path;
      default = null;
      example = "/etc/nixfleet/cp/database-ca.pem";
      description = "CA certificate(s) PostgreSQL's server certificate must chain to; set, the connection is TLS only and verified.";
    };
    databasePoolSize = {
      type = types.ints.positive;
      default = 16;
      description = "Connections each replica keeps to PostgreSQL.";
    };
    replicaName = {
      type = types.nullOr types.str;
      default = null;
      example = "cp-1";
      description = "This replica's name in logs, /healthz and the database (default: host name and listen port).";
    };
    auditLog = {
      type = absolute;
      default = "${stateDir}/audit.log";
      description = "Append-only certificate issuance log (JSON lines), kept outside the database.";
    };
    trustFile = {
      type = types.path;
      default = "${etcDir}/trust.json";
      description = "trust.json with the pinned roots; written from {option}`nixfleet.trust` when that is set.";
    };
    tlsCert = {
      type = types.path;
      default = "${etcDir}/server-cert.pem";
      description = "Server certificate (PEM), e.g. from `nixfleet cert server`.";
    };
    tlsKey = {
      type = absolute;
      default = "${etcDir}/server-key.pem";
      description = "Server private key (PEM). It may be readable by root only: systemd hands it to the service as a credential.";
    };
    clientCa = {
      type = types.path;
      default = "${etcDir}/ca.pem";
      description = "CA that issued agent and operator client certificates (the fleet CA certificate).";
    };
    fleetCaCert = {
      type = types.nullOr types.path;
      default = null;
      example = "${etcDir}/fleet-ca-cert.pem";
      description = "Fleet CA certificate, for issuing agent certificates at enrollment and renewal.";
    };
    fleetCaKey = {
      type = types.nullOr absolute;
      default = null;
      example = "${etcDir}/fleet-ca-key.pem";
      description = "Fleet CA private key, handed over as a credential. Without it /v1/enroll and /v1/agent/renew answer 503 and everything else works.";
    };
    certValidityDays = {
      type = types.ints.positive;
      default = 30;
      description = "Validity of issued agent certificates, in days.";
    };
    channelRefsArtifactUrl = {
      type = types.nullOr types.str;
      default = null;
      example = "https://forge.example.org/releases/fleet.resolved.json";
      description = "URL of the signed fleet.resolved.json (polled).";
    };
    channelRefsSignatureUrl = {
      type = types.nullOr types.str;
      default = null;
      example = "https://forge.example.org/releases/fleet.resolved.json.sig";
      description = "URL of its raw signature.";
    };
    channelRefsTokenFile = {
      type = types.nullOr absolute;
      default = null;
      description = "File holding a bearer token for the channel-refs and rollouts URLs, handed over as a credential.";
    };
    revocationsArtifactUrl = {
      type = types.nullOr types.str;
      default = null;
      description = "URL of the signed revocations.json (polled).";
    };
    revocationsSignatureUrl = {
      type = types.nullOr types.str;
      default = null;
      description = "URL of its raw signature.";
    };
    revocationsTokenFile = {
      type = types.nullOr absolute;
      default = null;
      description = "File holding a bearer token for the revocations URLs, handed over as a credential.";
    };
    artifact = {
      type = types.nullOr types.path;
      default = null;
      description = "Build-time fleet.resolved.json, used when the channel-refs URL cannot be verified.";
    };
    signature = {
      type = types.nullOr types.path;
      default = null;
      description = "Signature of {option}`artifact`.";
    };
    revocationsArtifact = {
      type = types.nullOr types.path;
      default = null;
      description = "Build-time revocations.json fallback.";
    };
    revocationsSignature = {
      type = types.nullOr types.path;
      default = null;
      description = "Signature of {option}`revocationsArtifact`.";
    };
    rolloutsDir = {
      type = types.nullOr types.path;
      default = null;
      description = "Directory of signed rollout manifests (`<rolloutId>.json` + `.sig`).";
    };
    rolloutsUrlTemplate = {
      type = types.nullOr types.str;
      default = null;
      example = "https://forge.example.org/releases/rollouts/channel/{channel}.json";
      description = "URL of each channel's current signed manifest, `{channel}` standing for the channel name; the signature is the same URL plus `.sig`.";
    };
    tickIntervalSecs = {
      type = types.ints.positive;
      default = 30;
      description = "Reconcile tick interval, seconds.";
    };
    channelRefsPollSecs = {
      type = types.ints.positive;
      default = 60;
      description = "Channel-refs poll interval, seconds.";
    };
    revocationsPollSecs = {
      type = types.ints.positive;
      default = 60;
      description = "Revocations poll interval, seconds.";
    };
    fetchTimeoutSecs = {
      type = types.ints.positive;
      default = 10;
      description = "Timeout of each artifact fetch, seconds.";
    };
    confirmWindowSecs = {
      type = types.ints.positive;
      default = 300;
      description = "How long an agent has to confirm once its switch has finished, seconds; sent to agents as `confirmWindowSecs` (they use at least 10 s).";
    };
    activationTimeoutSecs = {
      type = types.ints.unsigned;
      default = 1800;
      description = "How long a host has, from the delivery of its target, to fetch the closure and finish the switch, seconds. A host still fetching or switching after this long is failed; 0 makes the confirm window count from delivery.";
    };
    checkinIntervalSecs = {
      type = types.ints.positive;
      default = 60;
      description = "Base interval agents are told to check in at, seconds (jittered per host).";
    };
    reportsPerMinute = {
      type = types.ints.positive;
      default = 60;
      description = "Reports one host may send per minute; more get 429 and are sent again later.";
    };
    reportsPerHost = {
      type = types.ints.positive;
      default = 1000;
      description = "Reports kept per host; older ones are pruned as new ones arrive.";
    };
    maxConnections = {
      type = types.ints.unsigned;
      default = 0;
      description = "Open HTTPS connections at most; at the cap the longest idle one is closed to make room. 0: the open-file limit ({option}`openFilesLimit`) less what the database and files need.";
    };
    maxConnectionsPerSource = {
      type = types.ints.unsigned;
      default = 1024;
      description = "Open HTTPS connections from one source address (an IPv6 /64 counts as one) at most; more are closed unserved. Behind a TCP proxy every agent shares the proxy's address: raise it, or 0 for no limit.";
    };
    metricsListen = {
      type = types.nullOr types.str;
      default = null;
      example = "127.0.0.1:9464";
      description = "Plain-HTTP listener for /metrics; keep it on loopback.";
    };
    eventHook = {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/nixfleet/cp/notify-chat";
      description = "Command run (through `/bin/sh -c`) for rollout events (halted, converged, host failed), with the event as one JSON object on stdin. It runs as the service's user under the unit's sandbox, one event at a time; failures are logged.";
    };
    eventHookTimeoutSecs = {
      type = types.ints.positive;
      default = 10;
      description = "How long one run of {option}`eventHook` may take before it is killed, seconds.";
    };
    drainTimeoutSecs = {
      type = types.ints.unsigned;
      default = 10;
      description = "How long shutdown waits for in-flight requests, seconds (the unit's stop timeout allows for it).";
    };
  };

  # Root-only files the dynamic service user could not open: systemd reads them and
  # passes copies under /run/credentials/<unit>/, which is what the flags then name.
  credentials = {
    tlsKey = "tls-key";
    fleetCaKey = "fleet-ca-key";
    channelRefsTokenFile = "channel-refs-token";
    revocationsTokenFile = "revocations-token";
    databasePasswordFile = "database-password";
  };
  loaded = lib.filterAttrs (name: _: cfg.${name} != null) credentials;

  args = cli.toArgs {
    names = builtins.attrNames flagOptions;
    inherit cfg;
    values = lib.mapAttrs (_: id: "/run/credentials/${unit}/${id}") loaded;
  };

  listenPort = cli.portOf cfg.listen;
  ports = builtins.filter (port: port != null) [
    listenPort
    (if cfg.metricsListen == null then null else cli.portOf cfg.metricsListen)
  ];
  # Only a port below 1024 needs a capability; otherwise the service keeps none.
  privileged = builtins.any (port: port < 1024) ports;

  # ProtectSystem=strict leaves only the state directory writable; a database or audit
  # log placed elsewhere needs its directory opened (and writable by the service user).
  writableElsewhere = builtins.filter (dir: !lib.hasPrefix "${stateDir}/" "${dir}/") (
    lib.unique [
      (dirOf cfg.dbPath)
      (dirOf cfg.auditLog)
    ]
  );

  trustWritten = trust.ciReleaseKey != null && trust.orgRootKey != null;
in
{
  imports = [ ./trust.nix ];

  options.services.nixfleet-control-plane = {
    enable = lib.mkEnableOption "the nixfleet control plane";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ../package.nix {
        crate = "nixfleet-control-plane";
        mainProgram = "nixfleet-control-plane";
      };
      defaultText = lib.literalExpression "nixfleet-control-plane built from this flake's source with pkgs.rustPlatform";
      description = "The package providing `bin/nixfleet-control-plane`.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the port of {option}`listen` in the firewall (not the metrics port).";
    };

    openFilesLimit = mkOption {
      type = types.ints.positive;
      default = 65536;
      description = "The unit's `LimitNOFILE`: each HTTPS connection is a descriptor, and {option}`maxConnections` defaults to what this leaves.";
    };

    logLevel = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "debug";
      description = "Log filter (`NIXFLEET_LOG`, tracing's EnvFilter syntax); the binary logs at info by default.";
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

    warnings = lib.optional (trustWritten && toString cfg.trustFile != "${etcDir}/trust.json") "services.nixfleet-control-plane.trustFile is ${toString cfg.trustFile}, so the trust.json written from nixfleet.trust to ${etcDir}/trust.json is not used.";

    # A copy, not a store symlink, with the mode the binary insists on (not writable by
    # group or others). The control plane re-reads it when it changes: no restart.
    environment.etc."nixfleet/cp/trust.json" = lib.mkIf trustWritten {
      text = cli.trustJson trust;
      mode = "0644";
    };

    networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall (lib.optional (listenPort != null) listenPort);

    systemd.services.nixfleet-control-plane = {
      description = "nixfleet control plane";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = lib.optionalAttrs (cfg.logLevel != null) { NIXFLEET_LOG = cfg.logLevel; };

      serviceConfig = {
        Type = "exec";
        ExecStart = cli.command (lib.getExe cfg.package) args;
        LoadCredential = lib.mapAttrsToList (name: id: "${id}:${cfg.${name}}") loaded;
        Restart = "on-failure";
        RestartSec = "5s";
        # SIGTERM drains in-flight requests for up to drainTimeoutSecs, then closes the
        # database: give it that and some more before systemd kills it.
        KillSignal = "SIGTERM";
        TimeoutStopSec = "${toString (cfg.drainTimeoutSecs + 20)}s";
        # Each connection is a descriptor; maxConnections defaults to what this leaves.
        LimitNOFILE = cfg.openFilesLimit;

        # The control plane holds no secret it could leak and needs nothing but its
        # state directory, the network and the files it is given: lock the rest away.
        DynamicUser = true;
        User = "nixfleet-cp";
        Group = "nixfleet-cp";
        StateDirectory = "nixfleet-cp";
        StateDirectoryMode = "0700";
        UMask = "0077";
        ReadWritePaths = writableElsewhere;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [
          "AF_INET"
          "AF_INET6"
          "AF_UNIX"
        ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        CapabilityBoundingSet = if privileged then "CAP_NET_BIND_SERVICE" else "";
        AmbientCapabilities = lib.optional privileged "CAP_NET_BIND_SERVICE";
      };
    };
  };
}
