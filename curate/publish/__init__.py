"""Publish an output folder as a Hugging Face Hub dataset repository: card, bounded resumable commits, checks.

plan.py (repository paths, commits, dry-run tree), card.py (README.md), upload.py (commits with retries),
remote.py (remote entries and the check after upload), run.py (`curate publish`).
"""

from curate.publish.plan import PublishError
from curate.publish.run import PublishResult, PublishSettings, plan_repository, publish_output

__all__ = ["PublishError", "PublishResult", "PublishSettings", "plan_repository", "publish_output"]
