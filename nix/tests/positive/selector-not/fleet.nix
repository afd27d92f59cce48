# `not`: the complement of a selector, nested to any depth (`not not x` is x).
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
in
{
  hosts = {
    db-01 = host [ "db" ];
    db-02 = host [ "db" "canary" ];
    web-01 = host [ "web" ];
    web-02 = host [ "web" "canary" ];
  };
  channels.prod = {
    rolloutPolicy = "stateless-first";
    reconcileIntervalMinutes = 30;
    signingIntervalMinutes = 60;
    freshnessWindow = 1440;
  };
  rolloutPolicies.stateless-first = {
    strategy = "staged";
    waves = [
      { selector.not.not.tags = [ "canary" ]; soakMinutes = 60; }
      { selector.not.tags = [ "db" ]; soakMinutes = 30; }
      { selector.not.hosts = [ "nothing-by-this-name" ]; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "halt";
  };
  disruptionBudgets = [ { selector.not.tagsAny = [ "web" ]; maxInFlight = 1; } ];
}
