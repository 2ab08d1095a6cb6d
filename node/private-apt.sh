# Owns: a private apt for one Debian suite (its own sources list, lists and cache under a
# directory of the caller's, from the mirror this machine is configured with), so that
# packages can be fetched as .debs without installing anything or touching the system's
# apt (sourced by node/matrix-fetch.sh and deploy/fetch-kubectl.sh).
# Does not: install, extract or choose packages.
#
# private_apt DIR SUITE sets the array `apt_opts` and refreshes the lists at most daily.
# shellcheck source=node/mirror.sh
. "$(dirname "${BASH_SOURCE[0]}")/mirror.sh"

private_apt() {
  local apt_dir=$1 suite=$2 mirror stamp
  mirror=$(debian_mirror)
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/etc" "$apt_dir/debs"
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "$mirror" "$suite" > "$apt_dir/etc/sources.list"
  # Every path apt would read or write is private: the system's sources, lists, cache and
  # preferences are never seen nor changed. Status is /dev/null so that the system's
  # installed packages do not steer which version is chosen.
  apt_opts=(-o Dir::Etc::SourceList="$apt_dir/etc/sources.list" -o Dir::Etc::SourceParts=/dev/null
            -o Dir::State::Lists="$apt_dir/lists" -o Dir::State::Status=/dev/null
            -o Dir::Cache="$apt_dir/cache" -o Debug::NoLocking=1
            -o Acquire::Languages=none)
  # The lists are refreshed at most once a day: a test run should not depend on the
  # archive answering every time, and a suite's packages change seldom.
  stamp=$apt_dir/lists/.updated
  if [ ! -e "$stamp" ] || [ -n "$(find "$stamp" -mmin +1440)" ]; then
    apt-get "${apt_opts[@]}" -qq update >&2
    touch "$stamp"
  fi
}
