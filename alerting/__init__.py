"""Apprise notifications and the alert policy. Never imports `watcher`."""
