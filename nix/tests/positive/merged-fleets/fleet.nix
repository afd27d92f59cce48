# mergeFleets: three teams each describe their part; hosts, channels and policies are
# unioned, edges and budgets concatenated in fleet order. A team's host may use another
# team's channel, and an edge may cross teams.
{ mergeFleets, ... }:
let
  platform = {
    channels.prod = {
      rolloutPolicy = "canary";
      reconcileIntervalMinutes = 30;
      signingIntervalMinutes = 60;
      freshnessWindow = 1440;
      compliance = { frameworks = [ "cis" "pci-dss" ]; mode = "audit"; };
    };
    rolloutPolicies.canary = {
      strategy = "canary";
      waves = [
        { selector.tags = [ "canary" ]; soakMinutes = 30; }
        { selector.all = true; soakMinutes = 0; }
      ];
      healthGate = { systemdFailedUnits.max = 0; maxFailures = 0; };
      onHealthFailure = "rollback-and-halt";
    };
  };
  web = {
    hosts = {
      web-01 = { system = "x86_64-linux"; tags = [ "web" "canary" ]; channel = "prod"; };
      web-02 = { system = "x86_64-linux"; tags = [ "web" ]; channel = "prod"; };
    };
    edges = [ { before = "db-01"; after = "web-02"; reason = "web-02 needs the new schema"; } ];
    disruptionBudgets = [ { selector.tags = [ "web" ]; maxInFlightPct = 50; } ];
  };
  data = {
    hosts.db-01 = {
      system = "x86_64-linux";
      tags = [ "db" ];
      channel = "prod";
      pubkey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBx0K4mH8KjK6ZqFz3R0x8r2m7aHfR3wQvJ5ZyLq9X1a root@db-01";
    };
    edges = [ { before = "db-01"; after = "web-01"; } ];
    disruptionBudgets = [ { selector.tags = [ "db" ]; maxInFlight = 1; } ];
  };
in
mergeFleets [ platform web data ]
