from synprobe.cli import run

run()
