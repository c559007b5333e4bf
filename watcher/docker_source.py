"""The Docker engine as a source of container facts: ping, engine name, list and inspect.

Exec streams do not go through here (see watcher.dockerexec).
"""

from __future__ import annotations

from collections.abc import Mapping

import docker
import docker.errors
import requests.exceptions

from watcher.discovery import ContainerInfo
from watcher.dockerexec import DEFAULT_DOCKER_HOST

API_TIMEOUT_SECONDS = 30


class DockerUnavailable(Exception):
    """The engine cannot be reached or refused a call; the message names DOCKER_HOST."""


class DockerSource:
    """A thin, typed layer over docker-py's low-level client."""

    def __init__(self, docker_host: str | None) -> None:
        self.docker_host = docker_host or DEFAULT_DOCKER_HOST
        try:
            self.api = docker.APIClient(base_url=self.docker_host, timeout=API_TIMEOUT_SECONDS, version="auto")
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc

    def _describe(self, exc: Exception) -> str:
        reason = str(exc).split("(Caused by", 1)[0].strip()
        return f"cannot reach the Docker engine at DOCKER_HOST={self.docker_host}: {reason}"

    def engine_name(self) -> str:
        """Returns the engine's host name (`docker info` Name); raises DockerUnavailable."""
        try:
            return str(self.api.info()["Name"])
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc

    def inspect(self, container: str) -> ContainerInfo | None:
        """Returns one container's facts, or None if it does not exist; raises DockerUnavailable."""
        try:
            return ContainerInfo.from_inspect(self.api.inspect_container(container))
        except docker.errors.NotFound:
            return None
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc

    def running_containers(self) -> list[ContainerInfo]:
        """Returns every running container, fully inspected; raises DockerUnavailable.

        A container that vanishes between the list and its inspect is skipped.
        """
        try:
            listed = self.api.containers()
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc
        found = []
        for item in listed:
            info = self.inspect(str(item["Id"]))
            if info is not None and info.running:
                found.append(info)
        return found

    def list_all(self) -> list[tuple[str, str, bool]]:
        """Returns (id, name, running) of every container, stopped ones included; raises DockerUnavailable."""
        try:
            listed = self.api.containers(all=True)
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc
        return [(str(item["Id"]), str((item.get("Names") or ["/"])[0]).lstrip("/"), item.get("State") == "running")
                for item in listed]

    def run_throwaway(self, image: str, name: str, env: Mapping[str, str], labels: Mapping[str, str], *,
                      init: bool = False) -> str:
        """Creates and starts a container with no network and no published ports (with an init process
        as PID 1 when `init`, like `docker run --init`); returns its id.

        The environment travels in the API request body (never in any argv). Raises DockerUnavailable.
        """
        try:
            host_config = self.api.create_host_config(network_mode="none", auto_remove=False, init=init or None)
            created = self.api.create_container(image, name=name, environment=dict(env), labels=dict(labels),
                                                host_config=host_config, network_disabled=True)
            container_id = str(created["Id"])
            self.api.start(container_id)
            return container_id
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(f"starting a throwaway container from {image}: {self._describe(exc)}") from exc

    def remove(self, container_id: str) -> None:
        """Removes a container and its anonymous volumes, running or not; a missing one is fine."""
        try:
            self.api.remove_container(container_id, v=True, force=True)
        except docker.errors.NotFound:
            return
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc

    def containers_with_labels(self, *labels: str) -> list[tuple[str, str]]:
        """(id, name) of every container, running or not, that carries all `labels` (KEY or KEY=VALUE)."""
        try:
            listed = self.api.containers(all=True, filters={"label": list(labels)})
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise DockerUnavailable(self._describe(exc)) from exc
        return [(str(item["Id"]), str((item.get("Names") or ["/"])[0]).lstrip("/")) for item in listed]

    def close(self) -> None:
        """Releases the HTTP connection pool."""
        self.api.close()
