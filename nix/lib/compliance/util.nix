# Helpers for controls: reading a partial NixOS configuration, where an option that is
# not set counts as its NixOS default, and writing short evidence strings. Builtins only.
let
  inherit (builtins)
    all
    concatStringsSep
    elem
    foldl'
    fromJSON
    isAttrs
    isBool
    isFloat
    isInt
    isList
    isString
    length
    match
    substring
    stringLength
    toJSON
    typeOf
    ;
in
rec {
  # { found; value; } for the attribute at `path` (a list of names) in `set`.
  lookup =
    set: path:
    foldl' (
      acc: name:
      if acc.found && isAttrs acc.value && acc.value ? ${name} then
        {
          found = true;
          value = acc.value.${name};
        }
      else
        {
          found = false;
          value = null;
        }
    ) { found = true; value = set; } path;

  # An option of a (partial) configuration: { name; value; set; }. `set` is false when the
  # configuration does not carry it, and `value` is then the NixOS default given here.
  option = optionDefaultedBy "NixOS default";

  # `option`, for an option whose value when unset comes from elsewhere ("kernel default").
  optionDefaultedBy =
    source: config: path: default:
    let
      r = lookup config path;
    in
    {
      name = concatStringsSep "." (map quoteName path);
      value = if r.found then r.value else default;
      set = r.found;
      inherit source;
    };

  # An attribute name as NixOS documentation writes it: quoted when it is not a plain
  # identifier ("kernel.kptr_restrict").
  quoteName = name: if match "[A-Za-z_][A-Za-z0-9_'-]*" name != null then name else toJSON name;

  # A value for evidence. Derivations and functions are not forced (a real configuration
  # holds packages; printing one must not build or instantiate it).
  render =
    value:
    if value == null then
      "null"
    else if isBool value || isInt value || isFloat value || isString value then
      toJSON value
    else if isAttrs value && value ? shellPath then
      "<package with shellPath ${toJSON value.shellPath}>"
    else if isAttrs value && (value.type or null) == "derivation" then
      "<package>"
    else if isList value && all (v: isString v || isInt v || isBool v) value then
      toJSON value
    else
      "<${typeOf value}>";

  # "name = value", with "(NixOS default)" (or where the default comes from) appended
  # when the configuration does not set it.
  show = opt: "${opt.name} = ${render opt.value}${if opt.set then "" else " (${opt.source})"}";

  # The result of an evaluate function.
  result = passed: evidence: { inherit passed evidence; };

  # A sysctl value as an integer, or null when it is unset or not a number. NixOS accepts
  # integers, strings and booleans (true is 1) for boot.kernel.sysctl; null leaves the
  # key to the kernel.
  sysctlInt =
    value:
    if isInt value then
      value
    else if isBool value then
      (if value then 1 else 0)
    else if isString value && match " *-?[0-9]+ *" value != null then
      fromJSON (
        let
          trimmed = match " *(-?[0-9]+) *" value;
        in
        builtins.head trimmed
      )
    else
      null;

  # The last character of a string ("" for "").
  lastChar = s: if s == "" then "" else substring (stringLength s - 1) 1 s;

  # Whether an octal mode string ("0666", "777") lets others write.
  worldWritableMode =
    mode:
    isString mode
    && match "[0-7]{3,4}" mode != null
    && elem (lastChar mode) [
      "2"
      "3"
      "6"
      "7"
    ];

  # Names joined for evidence: "a, b and c"; at most `max` shown, then "and N more".
  listNames =
    max: names:
    let
      n = length names;
      shown = if n > max then (builtins.genList (i: builtins.elemAt names i) max) else names;
      more = if n > max then " and ${toString (n - max)} more" else "";
    in
    concatStringsSep ", " shown + more;
}
