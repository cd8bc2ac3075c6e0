"""Train an open_clip model on a `wds` export with open_clip_train, the trainer in the open_clip_torch wheel.

    python -m curate.export.clip_trainer --train-data 'EXPORT/shard-{000000..000003}.tar' \\
        --train-num-samples N --dataset-type webdataset --model curate-tiny \\
        --pretrained curate/models/tiny/curate-tiny.safetensors --batch-size 8 --device cpu ...

Takes exactly open_clip_train.main's arguments and runs it unchanged, after two things:

- the project's models (`curate-tiny`) are registered with open_clip, so `--model curate-tiny` works;
- open_clip_train 3.3's own tar grouping (`tarfile_to_samples_nothrow`) expects webdataset <= 0.2.86:
  webdataset 0.2.96 and later (the project uses 1.0) end every shard with an empty end-of-shard
  marker that it reads as a file and fails on (KeyError: 'fname'). The trainer's tar expander is
  given the 0.2.86 behaviour (no marker); samples are still grouped per shard by key.
"""

from __future__ import annotations

import functools
import inspect
import sys


def use_project_webdataset() -> bool:
    """Make open_clip_train's tar reading work with the installed webdataset; True if a change was needed."""
    import open_clip_train.data as trainer_data
    from webdataset import tariterators

    if "eof_value" not in inspect.signature(tariterators.tar_file_expander).parameters:
        return False
    trainer_data.tar_file_expander = functools.partial(tariterators.tar_file_expander, eof_value=None)
    return True


def main(argv: list[str] | None = None) -> None:
    """Run open_clip_train.main with `argv` (default: the command line)."""
    import curate.models.clip  # noqa: F401 - registers curate-tiny with open_clip

    use_project_webdataset()
    from open_clip_train.main import main as train

    train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
