# A disruption budget that limits nothing.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  disruptionBudgets = example.disruptionBudgets ++ [ { selector.tags = [ "web" ]; maxInFlightPct = null; } ];
}
