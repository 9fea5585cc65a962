# Shared by the benchmarks/run_*_gpu.sh scripts (sourced): a hard time budget of TOTAL_S seconds.
# left: seconds still left. budget CAP RESERVE: at most CAP seconds, keeping RESERVE for what follows.
# step TEXT: a progress header with the time used.
left() { echo $((TOTAL_S - SECONDS)); }
budget() { local b=$(( $(left) - $2 )); [ "$b" -gt "$1" ] && b=$1; echo "$b"; }
step() { echo; echo "=== [$SECONDS s / $TOTAL_S s] $*"; }
