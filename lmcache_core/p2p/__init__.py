"""Peer-to-peer transfer of chunks between instances (``enable_p2p``).

Each worker serves the chunks its engine holds at ``p2p_host:p2p_init_ports[rank]``
(``server.PeerServer``); on a local miss an engine asks the controller over the bus which peer
holds the longest prefix and fetches it (``client.fetch_chunks``), and the controller's moves
between instances have one worker push chunks to another (``client.push_chunks``). The bus only
says who holds what; bulk bytes travel on the channel (``channel``), authenticated, checksummed,
one chunk in flight at a time, with timeouts.
"""
