# A host that no wave selects joins the last wave, even when the last wave's own
# selector does not match it either (SPEC.md §4).
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
in
{
  hosts = {
    canary-01 = host [ "canary" ];
    db-01 = host [ "db" ];
    legacy-01 = host [ "legacy" ];
    misc-01 = host [ ];
    web-01 = host [ "web" ];
  };
  channels.prod = {
    rolloutPolicy = "web-then-db";
    reconcileIntervalMinutes = 30;
    signingIntervalMinutes = 60;
    freshnessWindow = 1440;
  };
  rolloutPolicies.web-then-db = {
    strategy = "staged";
    waves = [
      { selector.tags = [ "canary" ]; soakMinutes = 30; }
      { selector.tags = [ "web" ]; soakMinutes = 15; }
      { selector.tags = [ "db" ]; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "rollback-and-halt";
  };
}
