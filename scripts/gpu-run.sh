#!/usr/bin/env bash
# Kept for old notes and habits: the device check is scripts/gpu-check.sh.
exec bash "$(dirname "${BASH_SOURCE[0]}")/gpu-check.sh" "$@"
