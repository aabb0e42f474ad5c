"""``GET /v1/models`` and the model check every request makes.

One model is served: its name is the gpt2 model's ``model_name`` config parameter (what
the repository was built from: ``gpt2``, ``tiny``...), read from Triton on first use,
unless ``--model-name`` sets it. ``max_model_len`` is the ``context_window`` parameter.
"""

from __future__ import annotations

import time

from api.errors import ApiError
from api.protocol import ModelCard, ModelList
from api.triton import TritonClient


class ServingModels:
    def __init__(self, triton: TritonClient, model_name: str | None = None) -> None:
        self.triton = triton
        self.model_name = model_name
        self._card: ModelCard | None = None
        self._created = int(time.time())

    async def card(self, authorization: str | None = None) -> ModelCard:
        """The served model, read from Triton once (again after a failed read)."""
        if self._card is None:
            parameters = await self.triton.model_parameters(authorization)
            window = parameters.get("context_window", "")
            self._card = ModelCard(
                id=self.model_name or parameters.get("model_name") or self.triton.model,
                created=self._created,
                max_model_len=int(window) if window.isdigit() else None,
            )
        return self._card

    async def check(self, requested: str, authorization: str | None = None) -> str:
        """The served model's name; 404 for any other."""
        if self.model_name is not None:
            served = self.model_name  # no need to reach Triton to answer this
        else:
            served = (await self.card(authorization)).id
        if requested != served:
            raise ApiError(
                404,
                f"The model '{requested}' does not exist: this server serves '{served}'.",
                "model",
                "model_not_found",
            )
        return served

    async def list(self, authorization: str | None = None) -> ModelList:
        return ModelList(data=[await self.card(authorization)])
