# A wave whose selector says nothing: release refuses it rather than guess.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  rolloutPolicies = example.rolloutPolicies // {
    canary = example.rolloutPolicies.canary // {
      waves = [
        { selector = { }; soakMinutes = 30; }
        { selector.all = true; soakMinutes = 0; }
      ];
    };
  };
}
