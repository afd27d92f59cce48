# The starter controls (docs/compliance.md lists them with what each one checks).
#
# Each `evaluate` reads a partial NixOS configuration: an option that is not set counts
# as its NixOS default, written next to the option below. Each `probe` is a command the
# agent runs on the host after activation (see docs/compliance.md, "Probes"): exit 0 is
# pass, exit 1 is fail, anything else is an error; stdout is the evidence.
#
# `allowedLoginUsers`: the users allowed a login shell (login-shells-allow-list).
{ allowedLoginUsers }:
let
  inherit (builtins)
    any
    attrNames
    concatMap
    concatStringsSep
    elem
    filter
    isAttrs
    isList
    isString
    length
    match
    ;
  u = import ./util.nix;
  inherit (u)
    option
    show
    result
    render
    ;

  sh = script: [
    "/bin/sh"
    "-c"
    script
  ];
  probe = timeoutSecs: script: {
    command = sh script;
    inherit timeoutSecs;
    expect = "exit0";
  };

  # ------------------------------------------------------------------ SSH
  sshEnabled = config: option config [ "services" "openssh" "enable" ] false;
  sshSetting =
    config: name: default:
    option config [
      "services"
      "openssh"
      "settings"
      name
    ] default;

  # A host without /etc/ssh/sshd_config runs no SSH server (pass). Otherwise `setting k`
  # prints the effective value of k, lower case as `sshd -T` writes it. sshd is on the
  # system PATH when openssh is installed; sshd.service's ExecStart names it otherwise.
  sshdPrologue = ''
    if [ ! -e /etc/ssh/sshd_config ]; then
      echo 'no /etc/ssh/sshd_config: no SSH server'
      exit 0
    fi
    sshd=$(command -v sshd) || sshd=$(systemctl show -p ExecStart --value sshd.service | sed -n 's/^{ path=\([^ ;]*\).*/\1/p')
    [ -n "$sshd" ] || exit 2
    effective=$("$sshd" -T -f /etc/ssh/sshd_config) || exit 2
    setting() { printf '%s\n' "$effective" | awk -v k="$1" '$1 == k { print $2; exit }'; }
  '';

  # ------------------------------------------------------------------ users
  nologinPattern = ".*/(nologin|false)";
  # The shell path of a users.users.<name>.shell value: a package has `shellPath`
  # (pkgs.shadow's is /bin/nologin), a string is the path itself.
  shellPath =
    shell:
    if isAttrs shell && shell ? shellPath then
      shell.shellPath
    else if isString shell then
      shell
    else
      null;
  isLoginShell =
    shell:
    let
      p = shellPath shell;
    in
    # null: an empty shell field in /etc/passwd, which login reads as /bin/sh.
    if shell == null then true else p == null || match nologinPattern p == null;

  loginUsers =
    config:
    let
      users = option config [ "users" "users" ] { };
      defaultShell = option config [ "users" "defaultUserShell" ] "/run/current-system/sw/bin/bash";
      # NixOS always declares root (users-groups.nix), with users.defaultUserShell.
      declared = users.value // {
        root = users.value.root or { };
      };
      shellOf =
        user:
        if user ? shell then
          user.shell
        else if (user.useDefaultShell or false) || (user.isNormalUser or false) then
          defaultShell.value
        else
          # pkgs.shadow: nologin.
          "/run/current-system/sw/bin/nologin";
      rootShell = declared.root.shell or defaultShell.value;
    in
    filter (
      name:
      let
        user = declared.${name};
      in
      (user.enable or true) && isLoginShell (if name == "root" then rootShell else shellOf user)
    ) (attrNames declared);
in
[
  {
    id = "ssh-password-auth-off";
    title = "SSH password authentication is disabled";
    description = "Password and keyboard-interactive logins are both off: with PAM, keyboard-interactive asks for the password too.";
    articles = {
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.8.5" ];
      anssi = [ "R79" ];
      dora = [ "9.4.d" ];
    };
    # services.openssh.enable defaults to false; settings.PasswordAuthentication and
    # settings.KbdInteractiveAuthentication both default to true.
    evaluate =
      config:
      let
        enable = sshEnabled config;
        pw = sshSetting config "PasswordAuthentication" true;
        kbd = sshSetting config "KbdInteractiveAuthentication" true;
      in
      if enable.value != true then
        result true "${show enable}: no SSH server"
      else
        result (pw.value == false && kbd.value == false) "${show pw}, ${show kbd}";
    probe = probe 10 (
      sshdPrologue
      + ''
        pw=$(setting passwordauthentication)
        kbd=$(setting kbdinteractiveauthentication)
        echo "passwordauthentication $pw"
        echo "kbdinteractiveauthentication $kbd"
        [ "$pw" = no ] && [ "$kbd" = no ] || exit 1
      ''
    );
  }

  {
    id = "ssh-root-login-key-only";
    title = "root logs in over SSH with a key only, or not at all";
    articles = {
      cis = [ "5.2.8" ];
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.8.2" "A.8.5" ];
      dora = [ "9.4.d" ];
    };
    # services.openssh.settings.PermitRootLogin defaults to "prohibit-password".
    evaluate =
      config:
      let
        enable = sshEnabled config;
        root = sshSetting config "PermitRootLogin" "prohibit-password";
      in
      if enable.value != true then
        result true "${show enable}: no SSH server"
      else
        result (elem root.value [
          "no"
          "prohibit-password"
          "without-password"
          "forced-commands-only"
        ]) (show root);
    probe = probe 10 (
      sshdPrologue
      + ''
        root=$(setting permitrootlogin)
        echo "permitrootlogin $root"
        case "$root" in
          no|prohibit-password|without-password|forced-commands-only) exit 0 ;;
          *) exit 1 ;;
        esac
      ''
    );
  }

  {
    id = "firewall-enabled";
    title = "The host firewall is enabled";
    articles = {
      cis = [ "3.6.2" ];
      nis2 = [ "21.2.e" ];
      iso27001 = [ "A.8.20" ];
      anssi = [ "R80" ];
      dora = [ "9.4.b" ];
    };
    # networking.firewall.enable defaults to true.
    evaluate =
      config:
      let
        fw = option config [ "networking" "firewall" "enable" ] true;
      in
      result (fw.value == true) (show fw);
    # The iptables firewall is firewall.service; with networking.nftables.enable the
    # rules are the nftables table inet nixos-fw, loaded by nftables.service.
    probe = probe 10 ''
      if systemctl is-active --quiet firewall.service; then
        echo 'firewall.service active'
        exit 0
      fi
      if systemctl is-active --quiet nftables.service && nft list table inet nixos-fw >/dev/null 2>&1; then
        echo 'nftables.service active with table inet nixos-fw'
        exit 0
      fi
      echo 'neither firewall.service nor the nftables table inet nixos-fw is active'
      exit 1
    '';
  }

  {
    id = "auditd-enabled";
    title = "auditd records system activity";
    articles = {
      cis = [ "4.1.1.2" ];
      nis2 = [ "21.2.b" ];
      iso27001 = [ "A.8.15" ];
      anssi = [ "R73" ];
      dora = [ "10.1" ];
    };
    # security.auditd.enable defaults to false.
    evaluate =
      config:
      let
        auditd = option config [ "security" "auditd" "enable" ] false;
      in
      result (auditd.value == true) (show auditd);
    probe = probe 10 ''
      state=$(systemctl is-active auditd.service)
      echo "auditd.service $state"
      [ "$state" = active ] || exit 1
    '';
  }

  {
    id = "time-sync-enabled";
    title = "The clock is synchronised by a time daemon";
    articles = {
      cis = [ "2.2.1.1" ];
      iso27001 = [ "A.8.17" ];
    };
    # services.timesyncd.enable defaults to true (false when boot.isContainer, which
    # defaults to false); enabling chrony, ntpd, openntpd or ntpd-rs turns timesyncd off
    # and counts instead. Their enable options default to false.
    evaluate =
      config:
      let
        isContainer = option config [ "boot" "isContainer" ] false;
        timesyncd = option config [ "services" "timesyncd" "enable" ] (!isContainer.value);
        others = map (name: option config [ "services" name "enable" ] false) [
          "chrony"
          "ntp"
          "openntpd"
          "ntpd-rs"
        ];
        on = filter (o: o.value == true) others;
      in
      if on != [ ] then
        result true (concatStringsSep ", " (map show on))
      else
        result (timesyncd.value == true) (
          show timesyncd + (if isContainer.value == true && !timesyncd.set then " (in a container)" else "")
        );
    probe = probe 10 ''
      for unit in systemd-timesyncd chronyd ntpd openntpd ntpd-rs; do
        if systemctl is-active --quiet "$unit.service"; then
          echo "$unit.service active"
          exit 0
        fi
      done
      echo 'no time daemon is active (systemd-timesyncd, chronyd, ntpd, openntpd, ntpd-rs)'
      exit 1
    '';
  }

  {
    id = "etc-no-world-writable";
    title = "No file or directory under /etc is world-writable";
    articles = {
      cis = [ "6.1.10" ];
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.8.3" "A.8.9" ];
      anssi = [ "R50" ];
      dora = [ "9.4.c" ];
    };
    # environment.etc.<name>.mode defaults to "symlink" (a link into the read-only store);
    # an octal mode makes a copy with that mode.
    evaluate =
      config:
      let
        etc = option config [ "environment" "etc" ] { };
        entries = filter (name: (etc.value.${name}.enable or true)) (attrNames etc.value);
        modeOf = name: etc.value.${name}.mode or "symlink";
        writable = filter (name: u.worldWritableMode (modeOf name)) entries;
      in
      if writable == [ ] then
        result true "no environment.etc entry has a world-writable mode (${toString (length entries)} checked)"
      else
        result false (
          concatStringsSep ", " (
            map (name: "environment.etc.${u.quoteName name}.mode = ${render (modeOf name)}") writable
          )
        );
    probe = probe 30 ''
      found=$(find /etc -xdev \( -type f -o -type d \) -perm -0002 -print) || exit 2
      if [ -n "$found" ]; then
        printf '%s\n' "$found"
        exit 1
      fi
      echo 'no world-writable file or directory under /etc'
    '';
  }

  {
    id = "kernel-pointers-restricted";
    title = "Kernel pointers and the kernel log are hidden from unprivileged users";
    description = "kernel.kptr_restrict at least 1 and kernel.dmesg_restrict = 1.";
    articles = {
      nis2 = [ "21.2.g" ];
      iso27001 = [ "A.8.9" ];
      anssi = [ "R9" ];
    };
    # boot.kernel.sysctl: NixOS's sysctl module sets "kernel.kptr_restrict" = 1 by
    # mkDefault. "kernel.dmesg_restrict" is not set by NixOS, so the kernel's build-time
    # CONFIG_SECURITY_DMESG_RESTRICT decides; the configuration cannot show that, so an
    # unset dmesg_restrict fails: set it explicitly.
    evaluate =
      config:
      let
        kptr = option config [ "boot" "kernel" "sysctl" "kernel.kptr_restrict" ] 1;
        dmesg = option config [ "boot" "kernel" "sysctl" "kernel.dmesg_restrict" ] null;
        kptrN = u.sysctlInt kptr.value;
        dmesgN = u.sysctlInt dmesg.value;
      in
      result (kptrN != null && kptrN >= 1 && dmesgN == 1) (
        show kptr
        + ", "
        + (if dmesgN == null then "${dmesg.name} not set (left to the kernel build)" else show dmesg)
      );
    probe = probe 10 ''
      kptr=$(cat /proc/sys/kernel/kptr_restrict) || exit 2
      dmesg=$(cat /proc/sys/kernel/dmesg_restrict) || exit 2
      echo "kernel.kptr_restrict = $kptr"
      echo "kernel.dmesg_restrict = $dmesg"
      [ "$kptr" -ge 1 ] && [ "$dmesg" -eq 1 ] || exit 1
    '';
  }

  {
    id = "aslr-full";
    title = "Full address space layout randomisation";
    articles = {
      cis = [ "1.5.3" ];
      nis2 = [ "21.2.g" ];
      iso27001 = [ "A.8.9" ];
      anssi = [ "R9" ];
    };
    # boot.kernel.sysctl."kernel.randomize_va_space" is not set by NixOS; the kernel's
    # default is 2 (full randomisation).
    evaluate =
      config:
      let
        aslr = u.optionDefaultedBy "kernel default" config [
          "boot"
          "kernel"
          "sysctl"
          "kernel.randomize_va_space"
        ] 2;
        n = if aslr.value == null then 2 else u.sysctlInt aslr.value;
      in
      result (n == 2) (show aslr);
    probe = probe 10 ''
      aslr=$(cat /proc/sys/kernel/randomize_va_space) || exit 2
      echo "kernel.randomize_va_space = $aslr"
      [ "$aslr" -eq 2 ] || exit 1
    '';
  }

  {
    id = "nix-store-gc-bounded";
    title = "The Nix store is garbage-collected automatically";
    description = "The store cannot fill the disk unattended: nix.gc.automatic, or Nix's own min-free threshold.";
    articles = {
      nis2 = [ "21.2.c" ];
      iso27001 = [ "A.8.6" ];
      dora = [ "9.2" ];
    };
    # nix.gc.automatic and nix.optimise.automatic default to false; nix.settings.min-free
    # is unset, and Nix's own default is 0 (no collection when the disk runs low).
    evaluate =
      config:
      let
        gc = option config [ "nix" "gc" "automatic" ] false;
        minFree = u.optionDefaultedBy "Nix default" config [ "nix" "settings" "min-free" ] 0;
        optimise = option config [ "nix" "optimise" "automatic" ] false;
        minFreeN = u.sysctlInt minFree.value;
      in
      result (gc.value == true || (minFreeN != null && minFreeN > 0)) (
        concatStringsSep ", " [
          (show gc)
          (show minFree)
          (show optimise)
        ]
      );
    probe = probe 10 ''
      if systemctl is-active --quiet nix-gc.timer; then
        echo 'nix-gc.timer active'
        exit 0
      fi
      minfree=$(awk -F '[[:space:]]*=[[:space:]]*' '$1 ~ /^[[:space:]]*min-free$/ { v = $2 } END { print v + 0 }' /etc/nix/nix.conf) || exit 2
      echo "nix-gc.timer inactive, min-free = $minfree"
      [ "$minfree" -gt 0 ] || exit 1
    '';
  }

  {
    id = "no-failed-units";
    title = "No systemd unit has failed";
    description = "At runtime, systemctl lists no failed unit. Statically, the agent's health check counts failed units: services.nixfleet-agent.healthCommand is left null.";
    articles = {
      nis2 = [ "21.2.b" ];
      iso27001 = [ "A.8.16" ];
      dora = [ "10.1" ];
    };
    # services.nixfleet-agent.healthCommand defaults to null: the agent counts
    # `systemctl --failed`. A custom command may not count failed units at all.
    evaluate =
      config:
      let
        health = option config [ "services" "nixfleet-agent" "healthCommand" ] null;
      in
      result (health.value == null) (show health);
    probe = probe 10 ''
      failed=$(systemctl list-units --state=failed --no-legend --plain) || exit 2
      if [ -n "$failed" ]; then
        printf '%s\n' "$failed"
        exit 1
      fi
      echo 'no failed units'
    '';
  }

  {
    id = "sudo-requires-password";
    title = "sudo asks wheel members (and everyone else) for a password";
    articles = {
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.8.2" "A.8.5" ];
      dora = [ "9.4.c" ];
    };
    # security.sudo.enable defaults to true, security.sudo-rs.enable to false; for both,
    # wheelNeedsPassword defaults to true, extraRules to [ ] and extraConfig to "".
    evaluate =
      config:
      let
        check =
          name: enabledByDefault:
          let
            enable = option config [ "security" name "enable" ] enabledByDefault;
            wheel = option config [ "security" name "wheelNeedsPassword" ] true;
            rules = option config [ "security" name "extraRules" ] [ ];
            extra = option config [ "security" name "extraConfig" ] "";
            noAuth = [
              "NOPASSWD"
              "!authenticate"
            ];
            ruleOptions = concatMap (
              rule:
              concatMap (c: if isAttrs c then c.options or [ ] else [ ]) (rule.commands or [ ])
            ) (if isList rules.value then rules.value else [ ]);
            badRule = any (o: elem o noAuth) ruleOptions;
            # sudoers lines of extraConfig, without comments.
            extraLines =
              if isString extra.value then
                filter (l: isString l && match "[[:space:]]*#.*" l == null) (builtins.split "\n" extra.value)
              else
                [ ];
            badExtra = any (l: any (word: match ".*${word}.*" l != null) noAuth) extraLines;
            problems =
              (if wheel.value == false then [ (show wheel) ] else [ ])
              ++ (if badRule then [ "security.${name}.extraRules has a NOPASSWD command" ] else [ ])
              ++ (if badExtra then [ "security.${name}.extraConfig has NOPASSWD or !authenticate" ] else [ ]);
          in
          if enable.value != true then
            {
              ok = true;
              evidence = show enable;
            }
          else
            {
              ok = problems == [ ];
              evidence = if problems == [ ] then show wheel else concatStringsSep ", " problems;
            };
        both = [
          (check "sudo" true)
          (check "sudo-rs" false)
        ];
      in
      result (builtins.all (c: c.ok) both) (concatStringsSep ", " (map (c: c.evidence) both));
    probe = probe 10 ''
      if [ ! -e /etc/sudoers ]; then
        echo 'no /etc/sudoers: no sudo'
        exit 0
      fi
      found=$(grep -sE '^[^#]*(NOPASSWD|!authenticate)' /etc/sudoers /etc/sudoers.d/* || true)
      if [ -n "$found" ]; then
        printf '%s\n' "$found"
        exit 1
      fi
      echo 'no NOPASSWD or !authenticate in the sudoers files'
    '';
  }

  {
    id = "login-shells-allow-list";
    title = "Only listed users have a login shell";
    description = "Every user with a shell other than nologin or false is in the fleet's allow-list (allowedLoginUsers; default [ \"root\" ]).";
    articles = {
      cis = [ "5.4.2" ];
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.5.18" "A.8.2" ];
      anssi = [ "R30" "R34" ];
      dora = [ "9.4.c" ];
    };
    # NixOS always declares root, with users.defaultUserShell (default bash). A user's
    # shell defaults to users.defaultUserShell when isNormalUser or useDefaultShell is
    # set, and to pkgs.shadow (nologin) otherwise. Users declared by NixOS modules that the
    # configuration does not carry (service accounts) are not seen; the probe sees them.
    evaluate =
      config:
      let
        login = loginUsers config;
        extra = filter (name: !(elem name allowedLoginUsers)) login;
      in
      if extra == [ ] then
        result true (
          (if login == [ ] then "no user has a login shell" else "login shells: ${u.listNames 10 login}")
          + " (allowed: ${concatStringsSep ", " allowedLoginUsers})"
        )
      else
        result false "not allowed a login shell: ${u.listNames 10 extra}";
    probe = probe 10 ''
      getent passwd | awk -F: -v allowed=' ${concatStringsSep " " allowedLoginUsers} ' '
        $7 ~ /\/(nologin|false)$/ { next }
        { print $1 " " $7; if (index(allowed, " " $1 " ") == 0) { print "not allowed: " $1; bad = 1 } }
        END { exit bad }
      '
    '';
  }

  {
    id = "agent-control-plane-tls";
    title = "The agent reaches its control plane over TLS";
    articles = {
      nis2 = [ "21.2.h" ];
      iso27001 = [ "A.8.20" "A.8.24" ];
      dora = [ "9.3.a" ];
    };
    # services.nixfleet-agent.enable defaults to false; controlPlaneUrl has no default.
    evaluate =
      config:
      let
        enable = option config [ "services" "nixfleet-agent" "enable" ] false;
        url = option config [ "services" "nixfleet-agent" "controlPlaneUrl" ] null;
      in
      if enable.value != true then
        result true "${show enable}: no control-plane connection"
      else if !url.set || !isString url.value then
        result false "${url.name} is not set"
      else
        result (match "https://.+" url.value != null) (show url);
    probe = probe 10 ''
      if ! systemctl cat nixfleet-agent.service >/dev/null 2>&1; then
        echo 'no nixfleet-agent.service'
        exit 0
      fi
      url=$(systemctl show -p ExecStart --value nixfleet-agent.service | tr ' ' '\n' | awk 'take { print; exit } $0 == "--control-plane-url" { take = 1 }')
      echo "--control-plane-url $url"
      case "$url" in
        https://?*) exit 0 ;;
        *) exit 1 ;;
      esac
    '';
  }

  {
    id = "users-declarative";
    title = "User accounts are declared in the configuration only";
    description = "users.mutableUsers = false: useradd and passwd changes do not survive a switch, so the accounts are the reviewed ones.";
    articles = {
      nis2 = [ "21.2.i" ];
      iso27001 = [ "A.5.16" "A.8.9" ];
      dora = [ "9.4.c" ];
    };
    # users.mutableUsers defaults to true.
    evaluate =
      config:
      let
        mutable = option config [ "users" "mutableUsers" ] true;
      in
      result (mutable.value == false) (show mutable);
    probe = null;
    noProbeReason = "A running host shows its accounts, not whether they were declared or added by hand; login-shells-allow-list's probe checks the accounts themselves.";
  }
]
