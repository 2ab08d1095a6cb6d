# Owns: finding the Debian mirror this machine's apt is configured with (sourced by the
# node and matrix scripts). Does not: change any apt configuration.
#
# The first "debian" archive URI in the deb822 .sources files or one-line .list files,
# skipping the security archive (it carries no containerd and no debootstrap suite).
debian_mirror() {
  local f uri
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [ -r "$f" ] || continue
    case $f in
      *.sources) uri=$(sed -n 's/^URIs:[[:space:]]*//p' "$f" | tr ' ' '\n') ;;
      *) uri=$(sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]\+\).*/\2/p' "$f") ;;
    esac
    uri=$(printf '%s\n' $uri | grep -v -- '-security' | grep '/debian/\?$' | head -1 || true)
    if [ -n "$uri" ]; then echo "${uri%/}"; return 0; fi
  done
  echo "no Debian mirror found in /etc/apt/sources.list{,.d}" >&2
  return 1
}
