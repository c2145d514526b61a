"""Adapter management over HTTP: our routes and vLLM's dynamic LoRA routes, on the adapter catalog.

Off unless the app runs with `enable_adapter_management: true`; with a `management_token`, every
call needs it as a bearer token. Adapters are folders under `adapter_dir`, named by their folder;
merges are weighted sums of served adapters. A mixin of FloraIngress, whose catalog handle,
settings and catalog snapshot these routes use.
"""

import hmac
import re

from fastapi import Request
from fastapi.responses import PlainTextResponse
from ray.serve.handle import DeploymentHandle

from router.catalog import CatalogEntry, CatalogSnapshot
from router.errors import ApiError, bad_request, unknown_model
from router.http_app import app
from router.protocol import AdapterMerge, LoadAdapterRequest, LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from router.settings import IngressSettings


def _entry_dict(entry: CatalogEntry) -> dict:
    """A catalog entry as GET /v1/adapters lists it; a merge names its components and weights."""
    listed = {key: value for key, value in vars(entry).items() if key != "incarnation"}  # the replicas' concern
    return {**listed, "merged_from": [{"adapter": name, "weight": weight} for name, weight in entry.merged_from]}


def _merge_param(message: str) -> str:
    """The field a refused merge is about: the first word of the catalog's message (AdapterCatalog.merge)."""
    field = re.match(r"(name|weights)\b", message)
    return field.group(1) if field else "adapters"


class AdapterManagementRoutes:
    """GET /v1/adapters, POST /v1/adapters/{load,merge,unload}, vLLM's /v1/{load,unload}_lora_adapter."""

    settings: IngressSettings  # set by FloraIngress
    catalog: DeploymentHandle  # the AdapterCatalog deployment

    async def _snapshot(self, refresh: bool = False) -> CatalogSnapshot:
        raise NotImplementedError("FloraIngress keeps the catalog snapshot")

    @app.get("/v1/adapters")
    async def list_adapters(self) -> dict:
        snapshot = await self._snapshot(refresh=True)
        return {"object": "list", "data": [_entry_dict(e) for e in sorted(snapshot.entries.values(),
                                                                         key=lambda e: e.name)]}

    @app.post("/v1/adapters/load")
    async def load_adapter(self, body: LoadAdapterRequest, request: Request) -> dict:
        self._check_management(request)
        result = await self.catalog.load.remote(body.name)
        if isinstance(result, str):
            raise bad_request(result, "name")
        await self._snapshot(refresh=True)
        return {"loaded": _entry_dict(result)}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(self, body: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
        """vLLM's route: the same load as /v1/adapters/load, answered as vLLM answers."""
        self._check_management(request)
        if not body.load_inplace and body.lora_name in (await self._snapshot(refresh=True)).entries:
            raise bad_request(f"The lora adapter {body.lora_name!r} has already been loaded; pass load_inplace=true "
                              "to read it again", "lora_name")
        result = await self.catalog.load.remote(body.lora_name, body.lora_path)
        if isinstance(result, str):
            raise bad_request(result, "lora_path" if result.startswith("lora_path") else "lora_name")
        await self._snapshot(refresh=True)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(self, body: UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
        self._check_management(request)
        if not await self.catalog.unload.remote(body.lora_name):
            raise ApiError(404, f"The lora adapter {body.lora_name!r} cannot be found.", "not_found_error",
                           "lora_name")
        await self._snapshot(refresh=True)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/adapters/merge")
    async def merge_adapters(self, body: AdapterMerge, request: Request) -> dict:
        self._check_management(request)
        result = await self.catalog.merge.remote(body.name, body.recipe())
        if isinstance(result, str):
            raise bad_request(result, _merge_param(result))
        await self._snapshot(refresh=True)
        return {"merged": _entry_dict(result)}

    @app.post("/v1/adapters/unload")
    async def unload_adapter(self, body: LoadAdapterRequest, request: Request) -> dict:
        self._check_management(request)
        removed = await self.catalog.unload.remote(body.name)
        if not removed:
            raise unknown_model(body.name, "It is not loaded; GET /v1/adapters lists what is.")
        await self._snapshot(refresh=True)
        return {"unloaded": body.name, "merges_unloaded": removed[1:]}

    def _check_management(self, request: Request) -> None:
        if not self.settings.enable_adapter_management:
            raise ApiError(403, "adapter management is disabled; start the app with enable_adapter_management: true",
                           "permission_error")
        token = self.settings.management_token
        given = request.headers.get("authorization", "").encode()
        if token and not hmac.compare_digest(given, f"Bearer {token}".encode()):  # in constant time
            raise ApiError(401, "adapter management needs 'Authorization: Bearer <management_token>'",
                           "authentication_error")
