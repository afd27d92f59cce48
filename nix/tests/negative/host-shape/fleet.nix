# Host attributes missing, misspelt or of the wrong kind are caught before anything
# else, each naming the host and the attribute.
let
  example = import ../../positive/example/fleet.nix;
in
example // {
  hosts = example.hosts // {
    web-04 = { tag = [ "web" ]; channel = "stable"; };
    web-05 = { system = "x86_64-linux"; tags = [ "web" 5 ]; channel = "stable"; pubkey = 42; };
  };
}
