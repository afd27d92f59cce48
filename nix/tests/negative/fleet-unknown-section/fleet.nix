# A misspelt top-level section would otherwise drop every budget without a word.
let
  example = import ../../positive/example/fleet.nix;
in
(removeAttrs example [ "disruptionBudgets" ]) // { disruptionBudget = example.disruptionBudgets; }
