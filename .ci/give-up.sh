# Sourced by the .ci/install-*.sh scripts: what to do when a test tool cannot be installed.
# The script sets TOOL (its name in messages) and NEEDS (what CI must run with it).

in_ci() {
    case "$(printf '%s' "${CI:-}" | tr '[:upper:]' '[:lower:]')" in
        ""|0|false|no) return 1 ;;
        *) return 0 ;;
    esac
}

# Could not install: fatal under CI (the tests that need it must fail, not skip), a loud
# warning elsewhere (they skip, saying why).
give_up() {
    if in_ci; then
        echo "install-$TOOL: ERROR: $*; CI must run $NEEDS" >&2
        exit 1
    fi
    echo "install-$TOOL: WARNING: $*; $NEEDS will skip" >&2
    exit 0
}
