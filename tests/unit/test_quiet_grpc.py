"""grpc's ERROR for a status sent after the client left becomes one DEBUG line; its other errors stay."""

from __future__ import annotations

import logging

from node.rpc.quiet import GRPC_CORE_LOGGER, quiet_departed_clients


def test_a_status_sent_after_the_client_left_is_one_debug_line_and_other_grpc_errors_stay(caplog):
    quiet_departed_clients()
    quiet_departed_clients()  # once per process, however often a node starts in it
    logger = logging.getLogger(GRPC_CORE_LOGGER)
    assert sum(type(f).__name__ == "DepartedClientFilter" for f in logger.filters) == 1
    with caplog.at_level(logging.DEBUG, logger=GRPC_CORE_LOGGER):
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:  # as grpc logs it: with the traceback
            logger.exception("ExecuteBatchError raised in core by servicer method [/potluck.v1.Potluck/Inference]")
        logger.error("Unexpected error in the completion queue")
    departed, other = caplog.records[-2:]
    assert departed.levelno == logging.DEBUG and departed.exc_info is None
    assert departed.getMessage() == "a client left before the status of [/potluck.v1.Potluck/Inference] was sent"
    assert other.levelno == logging.ERROR and other.getMessage() == "Unexpected error in the completion queue"
