# Signed hourly but fresh for only 90 minutes: one late signing run and every host
# refuses the release as stale.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  channels = example.channels // {
    stable = example.channels.stable // { freshnessWindow = 90; };
  };
}
