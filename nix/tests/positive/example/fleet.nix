# examples/fleet.json, written in Nix: mkFleet's output must be that file plus the
# resolved waves (a test checks it), so the example and the library cannot drift.
{
  hosts = {
    db-01 = { system = "x86_64-linux"; tags = [ "db" ]; channel = "stable"; };
    db-02 = { system = "x86_64-linux"; tags = [ "db" ]; channel = "stable"; };
    lab-01 = { system = "x86_64-linux"; tags = [ "lab" ]; channel = "edge"; };
    web-01 = { system = "x86_64-linux"; tags = [ "web" "canary" ]; channel = "stable"; };
    web-02 = { system = "x86_64-linux"; tags = [ "web" ]; channel = "stable"; };
    web-03 = { system = "aarch64-linux"; tags = [ "web" ]; channel = "stable"; };
  };

  channels = {
    edge = {
      rolloutPolicy = "all-at-once";
      reconcileIntervalMinutes = 5;
      signingIntervalMinutes = 60;
      freshnessWindow = 1440;
      compliance = { mode = "disabled"; };
    };
    stable = {
      rolloutPolicy = "canary";
      reconcileIntervalMinutes = 30;
      signingIntervalMinutes = 60;
      freshnessWindow = 1440;
      compliance = { frameworks = [ "cis" ]; mode = "enforce"; };
    };
  };

  rolloutPolicies = {
    all-at-once = {
      strategy = "all-at-once";
      waves = [ { selector = { all = true; }; soakMinutes = 0; } ];
      healthGate = { systemdFailedUnits = { max = 0; }; maxFailures = 0; };
      onHealthFailure = "halt";
    };
    canary = {
      strategy = "canary";
      waves = [
        { selector = { tags = [ "canary" ]; }; soakMinutes = 30; }
        { selector = { tagsAny = [ "web" "db" ]; }; soakMinutes = 0; }
      ];
      healthGate = { systemdFailedUnits = { max = 0; }; maxFailures = 1; };
      onHealthFailure = "rollback-and-halt";
    };
  };

  edges = [ { before = "db-01"; after = "web-02"; reason = "schema migration first"; } ];
  channelEdges = [ { before = "edge"; after = "stable"; reason = "lab first"; } ];
  disruptionBudgets = [
    { selector = { tags = [ "db" ]; }; maxInFlight = 1; }
    { selector = { not = { tags = [ "db" ]; }; }; maxInFlightPct = 50; }
  ];
}
