# Evaluates one nixfleet NixOS module without nixpkgs, for the drift tests in
# crates/nixfleet-cli/tests/packaging.rs: a stand-in for the few nixpkgs lib functions
# the modules use, the service enabled, and the systemd service that comes out, as JSON.
#
#   module   path of the module file
#   service  the service name (services.<service>, systemd.services.<service>)
#   fill     give every option without a value (null, [] or no default) a sample value,
#            so that every flag appears on the command line; false: defaults only
#   set      option values to use instead (attrs)
#   trust    the nixfleet.trust value (null: not set)
#
# Not nixpkgs: option types are not checked and definitions are not merged; each stub
# keeps only what the tests look at. A module using a lib function missing here fails
# with "attribute '…' missing": add the function below.
{
  module,
  service,
  fill ? true,
  set ? { },
  trust ? null,
}:
let
  # Option types: a name, and a sample value for `fill`.
  type = name: sample: { inherit name sample; };
  types = {
    bool = type "bool" true;
    str = type "str" "sample value with spaces, % and $";
    path = type "path" "/sample/path";
    package = type "package" null;
    int = type "int" 1;
    port = type "port" 1;
    ints = {
      positive = type "positive int" 7;
      unsigned = type "unsigned int" 7;
    };
    strMatching = regex: type "string matching ${regex}" "/sample/matching";
    enum = values: type "enum" (builtins.head values);
    nullOr = t: type "null or ${t.name}" t.sample;
    listOf = t: type "list of ${t.name}" [
      t.sample
      "${toString t.sample}-2"
    ];
    submodule = _: type "submodule" { };
  };

  mkIf = condition: content: {
    _type = "if";
    inherit condition content;
  };

  # mkIf's meaning: a false condition removes the definition.
  resolve =
    value:
    if builtins.isAttrs value && value._type or null == "if" then
      (if value.condition then resolve value.content else { _drop = true; })
    else if builtins.isAttrs value && !(value ? outPath) then
      builtins.mapAttrs (_: resolve) (
        builtins.removeAttrs value (
          builtins.filter (
            n:
            let
              v = value.${n};
            in
            builtins.isAttrs v && v._type or null == "if" && !v.condition
          ) (builtins.attrNames value)
        )
      )
    else
      value;

  lib = {
    inherit types mkIf;
    mkOption = args: args // { _type = "option"; };
    mkEnableOption = what: {
      _type = "option";
      type = types.bool;
      default = false;
      description = "Whether to enable ${what}.";
    };
    literalExpression = text: {
      _type = "literalExpression";
      inherit text;
    };
    optional = cond: x: if cond then [ x ] else [ ];
    optionals = cond: xs: if cond then xs else [ ];
    optionalAttrs = cond: attrs: if cond then attrs else { };
    mapAttrs = builtins.mapAttrs;
    mapAttrsToList = f: attrs: map (n: f n attrs.${n}) (builtins.attrNames attrs);
    filterAttrs =
      pred: attrs:
      builtins.removeAttrs attrs (
        builtins.filter (n: !(pred n attrs.${n})) (builtins.attrNames attrs)
      );
    concatStringsSep = builtins.concatStringsSep;
    hasPrefix = prefix: s: builtins.substring 0 (builtins.stringLength prefix) s == prefix;
    unique = builtins.foldl' (acc: x: if builtins.elem x acc then acc else acc ++ [ x ]) [ ];
    getExe = pkg: "${pkg}/bin/${pkg.meta.mainProgram}";
  };

  fakePackage = name: mainProgram: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    meta = { inherit mainProgram; };
  };
  pkgs = {
    callPackage = _fn: args: fakePackage args.crate args.mainProgram;
  };

  evaluated = import module {
    inherit lib pkgs config;
  };
  options = evaluated.options.services.${service};

  # What the module would see: every option at its default (or a sample), then `set`.
  valueOf =
    name: option:
    let
      default = option.default or null;
      unset = default == null || default == [ ];
    in
    if fill && unset && option.type.sample != null then option.type.sample else default;
  values = builtins.mapAttrs valueOf options // { enable = true; } // set;

  config = {
    services.${service} = values;
    nixfleet.trust = if trust == null then
      {
        ciReleaseKey = null;
        orgRootKey = null;
        cacheKeys = [ ];
      }
    else
      trust;
    nix.package = fakePackage "nix" "nix";
  };

  out = resolve evaluated.config.content;
  unit = out.systemd.services.${service};
in
{
  imports = map toString evaluated.imports;
  options = builtins.mapAttrs (
    _: option:
    {
      type = option.type.name;
      default = if option.type.name == "package" then null else option.default or null;
    }
  ) options;
  # The service as the tests render it: unit, service and install settings.
  service = {
    inherit (unit) description wantedBy after;
    wants = unit.wants or [ ];
    restartIfChanged = unit.restartIfChanged or true;
    path = map (p: p.name) (unit.path or [ ]);
    environment = unit.environment or { };
    serviceConfig = unit.serviceConfig;
  };
  etc = builtins.mapAttrs (_: file: { inherit (file) text mode; }) (out.environment.etc or { });
  firewall = out.networking.firewall.allowedTCPPorts or [ ];
  assertions = map (a: { inherit (a) assertion message; }) (out.assertions or [ ]);
  warnings = out.warnings or [ ];
}
