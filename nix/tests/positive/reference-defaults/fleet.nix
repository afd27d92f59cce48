# A fleet written for the reference mkFleet, each of its parts setting only what the
# reference requires: a wave without soakMinutes, a policy without healthGate settings or
# onHealthFailure, channels without intervals or compliance settings, edges without a
# reason, a budget with one limit, a revocation without reason or author, and the
# reference's descriptive attributes (tags, a channel's description). Each optional value
# resolves to the reference default (docs/declare-your-fleet.md lists them), and release
# accepts every one of them.
{
  hosts = {
    db-01 = { system = "x86_64-linux"; channel = "stable"; tags = [ "db" ]; };
    web-01 = { system = "x86_64-linux"; channel = "stable"; };
    lab-01 = { system = "aarch64-linux"; channel = "edge"; };
  };
  tags.db = { };
  channels = {
    stable = { rolloutPolicy = "staged"; freshnessWindow = 1440; description = "production"; };
    edge = { rolloutPolicy = "staged"; freshnessWindow = 120; compliance = { }; };
  };
  rolloutPolicies.staged = {
    strategy = "staged";
    waves = [
      { selector.tags = [ "db" ]; }
      { selector.all = true; }
    ];
    healthGate = { };
  };
  edges = [ { before = "db-01"; after = "web-01"; } ];
  channelEdges = [ { before = "edge"; after = "stable"; } ];
  disruptionBudgets = [
    { selector.tags = [ "db" ]; maxInFlight = 1; }
    { selector.all = true; maxInFlightPct = 50; }
  ];
  revocations = [ { hostname = "old-01"; notBefore = "2026-01-01T00:00:00Z"; } ];
}
