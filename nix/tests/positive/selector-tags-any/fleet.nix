# `tagsAny`: a host needs one of the listed tags. Tags a host carries but no selector
# names (web-02's "frontend") change nothing.
let
  host = tags: { system = "x86_64-linux"; inherit tags; channel = "prod"; };
in
{
  hosts = {
    cache-01 = host [ "cache" ];
    db-01 = host [ "db" ];
    queue-01 = host [ "queue" ];
    web-01 = host [ "web" ];
    web-02 = host [ "web" "frontend" ];
    bastion-01 = host [ ];
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
      { selector.tagsAny = [ "web" "cache" ]; soakMinutes = 20; }
      { selector.tagsAny = [ "db" "queue" ]; soakMinutes = 0; }
    ];
    healthGate.maxFailures = 0;
    onHealthFailure = "rollback-and-halt";
  };
}
