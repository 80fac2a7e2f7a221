"""The Flower App of :mod:`gradiv_lib.federated.flower` (chapter 7.4): its ``ServerApp`` and ``ClientApp``.

``flwr run`` names them in the App's ``pyproject.toml`` (:data:`gradiv_lib.federated.flower.APP_COMPONENTS`)::

    [tool.flwr.app.components]
    serverapp = "gradiv_lib.federated.flower_app:server_app"
    clientapp = "gradiv_lib.federated.flower_app:client_app"

Importing this module imports Flower (the ``[flower]`` extra).
"""
from __future__ import annotations

from .flower import client_query, client_train, require_flwr, server_main

require_flwr()

from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402

__all__ = ["client_app", "server_app"]

#: The ClientApp: ``query`` (which partition this node holds) and ``train`` (the client's local work).
client_app = ClientApp()
client_app.query()(client_query)
client_app.train()(client_train)

#: The ServerApp: :func:`~gradiv_lib.federated.flower.server_main`.
server_app = ServerApp()
server_app.main()(server_main)
