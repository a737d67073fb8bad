from sidecar.adapters.broker import connection_url
from sidecar.core.messages import tier_queue_name


def test_connection_is_named_and_gets_the_configured_heartbeat():
    assert (
        connection_url("amqp://u:p@host:5672/vh", "sidecar-a-consume", 30)
        == "amqp://u:p@host:5672/vh?name=sidecar-a-consume&heartbeat=30"
    )


def test_a_heartbeat_in_the_url_wins():
    url = connection_url("amqp://u:p@host/?heartbeat=5&connection_timeout=2000", "n", 30)
    assert url == "amqp://u:p@host/?heartbeat=5&connection_timeout=2000&name=n"


def test_tier_queue_names_carry_queue_and_ttl():
    assert (
        tier_queue_name("sidecar.retry", "url.to_scrape", 0.2)
        == "sidecar.retry.url.to_scrape.200ms"
    )
