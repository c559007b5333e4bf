"""The Docker engine as a source of container facts: engine name, list and inspect, throwaway containers.

Exec streams do not go through here (see watcher.dockerexec). Both speak the Engine API through the same
small client (watcher.dockerexec.api_call, one connection per request): docker-py and requests cost a
one-shot `backup` about a fifth of its start-up CPU in imports alone, for the handful of calls made here.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from watcher.discovery import ContainerInfo
from watcher.dockerexec import DEFAULT_DOCKER_HOST, DockerExecError, DockerRefused, api_call, scheme_problem

API_TIMEOUT_SECONDS = 30
NOT_FOUND = 404


class DockerUnavailable(Exception):
    """The engine cannot be reached or refused a call; the message names DOCKER_HOST."""


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


class DockerSource:
    """Typed calls of the Engine API; every failure is a DockerUnavailable that names DOCKER_HOST."""

    def __init__(self, docker_host: str | None) -> None:
        """Raises DockerUnavailable when DOCKER_HOST has a scheme this client cannot speak (nothing is sent)."""
        self.docker_host = docker_host or DEFAULT_DOCKER_HOST
        if (problem := scheme_problem(self.docker_host)) is not None:
            raise DockerUnavailable(problem)

    def _describe(self, exc: DockerExecError) -> str:
        reason = str(exc)
        if f"DOCKER_HOST={self.docker_host}" in reason:
            return reason
        return f"the Docker engine at DOCKER_HOST={self.docker_host}: {reason}"

    def _call(self, method: str, path: str, body: object | None = None, *, missing_ok: bool = False) -> object:
        """One API call's decoded answer (None: the object is missing and `missing_ok`); raises DockerUnavailable."""
        try:
            return api_call(self.docker_host, method, path, body, timeout=API_TIMEOUT_SECONDS)
        except DockerRefused as exc:
            if missing_ok and exc.status == NOT_FOUND:
                return None
            raise DockerUnavailable(self._describe(exc)) from exc
        except DockerExecError as exc:
            raise DockerUnavailable(self._describe(exc)) from exc

    def _listed(self, query: Mapping[str, str]) -> list[dict[str, object]]:
        """GET /containers/json with `query`; raises DockerUnavailable (also for an answer that is no list)."""
        answer = self._call("GET", f"/containers/json?{urllib.parse.urlencode(query)}" if query else "/containers/json")
        if not isinstance(answer, list):
            raise DockerUnavailable(f"the Docker engine at DOCKER_HOST={self.docker_host} answered the container "
                                    f"list with {type(answer).__name__}, not a list")
        return [item for item in answer if isinstance(item, dict)]

    def check(self) -> None:
        """Asks the engine for its version: it answers, or this raises DockerUnavailable naming DOCKER_HOST (the
        daemon's start: a watcher that cannot reach its engine exits at once, even with WATCHER_HOST set)."""
        self._call("GET", "/version")

    def engine_name(self) -> str:
        """Returns the engine's host name (`docker info` Name); raises DockerUnavailable."""
        info = self._call("GET", "/info")
        if not isinstance(info, dict) or "Name" not in info:
            raise DockerUnavailable(f"the Docker engine at DOCKER_HOST={self.docker_host} answered /info without "
                                    "a Name")
        return str(info["Name"])

    def inspect(self, container: str) -> ContainerInfo | None:
        """Returns one container's facts, or None if it does not exist; raises DockerUnavailable."""
        answer = self._call("GET", f"/containers/{_quoted(container)}/json", missing_ok=True)
        return ContainerInfo.from_inspect(answer) if isinstance(answer, dict) else None

    def running_containers(self) -> list[ContainerInfo]:
        """Returns every running container, fully inspected; raises DockerUnavailable.

        A container that vanishes between the list and its inspect is skipped.
        """
        found = []
        for item in self._listed({}):
            info = self.inspect(str(item["Id"]))
            if info is not None and info.running:
                found.append(info)
        return found

    def list_all(self) -> list[tuple[str, str, bool]]:
        """Returns (id, name, running) of every container, stopped ones included; raises DockerUnavailable."""
        return [(str(item["Id"]), _name_of(item), item.get("State") == "running")
                for item in self._listed({"all": "1"})]

    def run_throwaway(self, image: str, name: str, env: Mapping[str, str], labels: Mapping[str, str], *,
                      init: bool = False) -> str:
        """Creates and starts a container with no network and no published ports (with an init process
        as PID 1 when `init`, like `docker run --init`); returns its id.

        The environment travels in the API request body (never in any argv). Raises DockerUnavailable.
        """
        host_config: dict[str, object] = {"NetworkMode": "none", "AutoRemove": False}
        if init:
            host_config["Init"] = True
        body = {"Image": image, "Env": [f"{key}={value}" for key, value in env.items()], "Labels": dict(labels),
                "HostConfig": host_config, "NetworkDisabled": True}
        try:
            created = self._call("POST", f"/containers/create?{urllib.parse.urlencode({'name': name})}", body)
            if not isinstance(created, dict) or "Id" not in created:
                raise DockerUnavailable(f"the Docker engine at DOCKER_HOST={self.docker_host} created no container")
            container_id = str(created["Id"])
            self._call("POST", f"/containers/{_quoted(container_id)}/start")
        except DockerUnavailable as exc:
            raise DockerUnavailable(f"starting a throwaway container from {image}: {exc}") from exc
        return container_id

    def remove(self, container_id: str) -> None:
        """Removes a container and its anonymous volumes, running or not; a missing one is fine."""
        self._call("DELETE", f"/containers/{_quoted(container_id)}?v=1&force=1", missing_ok=True)

    def labelled_containers(self, *labels: str) -> list[ListedContainer]:
        """Every container, running or not, that carries all `labels` (KEY or KEY=VALUE); raises
        DockerUnavailable."""
        listed = self._listed({"all": "1", "filters": json.dumps({"label": list(labels)})})
        return [ListedContainer.of(item) for item in listed]

    def close(self) -> None:
        """Nothing to release: every call had its own connection, closed when it was answered."""


@dataclass(frozen=True)
class ListedContainer:
    """One item of the engine's container list: id, name, labels, creation time (Unix seconds)."""

    id: str
    name: str
    labels: Mapping[str, str]
    created: float

    @classmethod
    def of(cls, item: Mapping[str, object]) -> ListedContainer:
        """The container a /containers/json item describes (missing fields: empty, created 0)."""
        labels = item.get("Labels")
        created = item.get("Created")
        return cls(str(item["Id"]), _name_of(item),
                   {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {},
                   float(created) if isinstance(created, int | float) else 0.0)


def _name_of(listed: Mapping[str, object]) -> str:
    """The container name of a /containers/json item (its first name, without the leading slash)."""
    names = listed.get("Names")
    first = names[0] if isinstance(names, list) and names else "/"
    return str(first).lstrip("/")
