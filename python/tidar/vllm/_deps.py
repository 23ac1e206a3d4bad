"""The internal pieces of ``tidar`` the vLLM plugin uses, in one place (their modules may move; only this file
names them)."""

from tidar.decode.context_drafts import NgramIndex

__all__ = ["NgramIndex"]
