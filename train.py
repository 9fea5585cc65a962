"""QLoRA fine-tuning.

    python train.py --config configs/guanaco_33b.py [--set section.key=value ...] [--output-dir DIR] [--resume]

See ``qlora_jax/trainer.py`` for what the run writes into the output directory and
``qlora_jax/train_config.py`` for the config sections and keys.

Several GPUs of one host: ``--set mesh.data=D --set mesh.fsdp=F`` with ``D * F`` = the GPU count.
Several hosts: start this same command once per host (process), with the same config and a
shared ``--output-dir``; ``jax.distributed.initialize()`` runs first when the environment names
the job (``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i``, or SLURM /
Open MPI; ``--set mesh.distributed=on|off`` forces it), and ``mesh.data * mesh.fsdp`` must equal
the devices of all hosts together.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path, help="a config file with get_config() (see configs/)")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override one config value (repeatable), e.g. --set lora.r=16")
    ap.add_argument("--output-dir", type=Path, help="where checkpoints, metrics and the adapter go "
                    "(default: runs/<config name>)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    args = ap.parse_args(argv)

    from qlora_jax.train_config import ConfigError, load_config
    from qlora_jax.trainer import TrainingError, train

    try:
        cfg = load_config(args.config, args.set)
        out = args.output_dir or Path("runs") / args.config.stem
        result = train(cfg, out, resume=args.resume)
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(f"done: {result.steps_done} steps; outputs in {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
