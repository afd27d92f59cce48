# `tags`: a host must carry every listed tag. web-02 has "web" but not "canary", so it
# skips wave 0; mail-01 matches no wave and joins the last one.
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
in
{
  hosts = {
    web-01 = host [ "web" "canary" ];
    web-02 = host [ "web" ];
    db-01 = host [ "db" "canary" ];
    db-02 = host [ "db" ];
    mail-01 = host [ "mail" ];
  };
  channels.prod = {
    rolloutPolicy = "by-tag";
    reconcileIntervalMinutes = 15;
    signingIntervalMinutes = 60;
    freshnessWindow = 120; # exactly 2 × signingIntervalMinutes: the smallest allowed
  };
  rolloutPolicies.by-tag = {
    strategy = "staged";
    waves = [
      { selector.tags = [ "web" "canary" ]; soakMinutes = 60; }
      { selector.tags = [ "canary" ]; soakMinutes = 30; }
      { selector.tags = [ "web" ]; soakMinutes = 10; }
      { selector.tags = [ "db" ]; soakMinutes = 0; }
    ];
    healthGate = { systemdFailedUnits.max = 1; maxFailures = 2; };
    onHealthFailure = "halt";
  };
}
