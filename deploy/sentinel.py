"""
Redis with failover in the native runtime (REDIS_SENTINEL=1): supervisord runs a primary on
REDIS_PORT, its replica on REDIS_PORT+1 and three Sentinels on REDIS_PORT+2..+4
(deploy/supervisord.conf.template). This writes the Sentinels' config files and tells when
they are ready to fail over.
"""

import redis
from django.template import Context, Engine

from shared_settings.topology import ROOT


def write_configs(topology):
    """
    Write each Sentinel's config file afresh. A Sentinel rewrites its own as it learns, so
    one kept from an earlier run would start it with that run's primary, replica and peers.
    """
    template = Engine(dirs=[str(ROOT)]).get_template("deploy/sentinel.conf.template")
    for number, port in enumerate(topology.sentinel_ports, 1):
        context = {"topology": topology, "port": port, "state": topology.state_dir}
        path = topology.state_dir / f"sentinel-{number}.conf"
        path.write_text(template.render(Context(context, autoescape=False, use_l10n=False)))


def ready(topology):
    """
    True once the replica holds a copy of the primary (a failover before that would promote
    an empty replica) and every Sentinel watches the primary and knows the replica and the two
    other Sentinels: from then on a primary that dies is replaced, its data kept.
    """
    try:
        with _client(topology.redis_replica_port) as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for port in topology.sentinel_ports:
            with _client(port) as sentinel:
                state = sentinel.sentinel_master(topology.redis_sentinel_master)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
    except redis.RedisError:
        return False
    return True


def _client(port):
    return redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
