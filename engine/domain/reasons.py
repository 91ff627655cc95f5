"""Every reason code the engine gives, in one place: `signal.decided`'s `reason_code` and a dead
letter's. They are strings on the wire (StrEnum), so consumers and the MySQL columns see the same
text as before; a test checks each is documented. A venue's own refusals add codes named after
its error (`venue_code_<n>`, `venue_<error>`), which no enum can list in advance."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # accepted
    ACCEPTED = "accepted"
    ACCEPTED_AFTER_LOOKUP = "accepted_after_lookup"  # an order of unknown outcome was found filled
    RECOVERED = "recovered"  # executed before a restart; the decision is recorded now
    # ignored and duplicate
    HOLD = "hold"
    NOTHING_TO_CLOSE = "nothing_to_close"
    DUPLICATE_SIGNAL_ID = "duplicate_signal_id"
    # refused by the checks (docs/semantics.md, docs/contract.md, docs/risk.md)
    STRATEGY_NOT_ALLOWED = "strategy_not_allowed"
    SYMBOL_NOT_ALLOWED = "symbol_not_allowed"
    UNKNOWN_SYMBOL = "unknown_symbol"
    FUTURE_TIMESTAMP = "future_timestamp"
    STALE = "stale"
    NO_PRICE = "no_price"
    PRICE_OUT_OF_BAND = "price_out_of_band"
    LOW_CONFIDENCE = "low_confidence"
    NO_BALANCE = "no_balance"
    NO_SIZE = "no_size"
    BELOW_MIN_QUANTITY = "below_min_quantity"
    BELOW_MIN_NOTIONAL = "below_min_notional"
    ABOVE_MAX_QUANTITY = "above_max_quantity"
    ORDER_TOO_LARGE = "order_too_large"
    INVALID_TP_SL = "invalid_tp_sl"
    OPPOSITE_CONFLICT = "opposite_conflict"
    POSITION_EXISTS = "position_exists"
    WEAKER_THAN_EXISTING = "weaker_than_existing"
    MAX_ACCUMULATIONS = "max_accumulations"
    RISK_LIMIT_KEY = "risk_limit_key"
    RISK_LIMIT_TOTAL = "risk_limit_total"
    RISK_LIMIT_STRATEGY = "risk_limit_strategy"
    RISK_LIMIT_POSITIONS = "risk_limit_positions"
    RATE_LIMITED = "rate_limited"
    HALTED = "halted"
    DAILY_LOSS_LIMIT = "daily_loss_limit"
    # execution
    VENUE_UNCERTAIN = "venue_uncertain"  # an earlier order on the symbol has an unknown outcome
    NOT_PLACED = "not_placed"  # looked up: the venue never placed it
    PARTLY_PLACED = "partly_placed"  # one of the signal's orders filled after a lookup, the rest not sent
    VENUE_ERROR = "venue_error"
    INTERNAL_ERROR = "internal_error"  # a bug met this signal; it cost this signal only
    # the venue's refusals the engine knows by name (paper venue, Binance codes)
    INVALID_QUANTITY = "invalid_quantity"
    INVALID_PRECISION = "invalid_precision"
    INSUFFICIENT_MARGIN = "insufficient_margin"
    REDUCE_ONLY_REJECTED = "reduce_only_rejected"
    REDUCE_EXCEEDS_POSITION = "reduce_exceeds_position"
    POSITION_SIDE_REQUIRED = "position_side_required"
    POSITION_SIDE_MISMATCH = "position_side_mismatch"
    PARAMETER_NOT_REQUIRED = "parameter_not_required"
    NOT_FILLED = "not_filled"  # the venue ended the order unfilled
    VENUE_UNAVAILABLE = "venue_unavailable"  # refused for now, attempt after attempt
    # the account's settings (LEVERAGE, MARGIN_TYPE) could not be made what they must be
    LEVERAGE_NOT_SET = "leverage_not_set"
    MARGIN_TYPE_NOT_SET = "margin_type_not_set"
    ACCOUNT_SETTINGS_REFUSED = "account_settings_refused"
    ACCOUNT_SETTINGS_UNKNOWN = "account_settings_unknown"


class DeadLetter(StrEnum):
    """Why a message never became a signal (docs/contract.md)."""

    OVERSIZE = "oversize"
    BAD_SUBJECT = "bad_subject"
    TOO_DEEP = "too_deep"
    BAD_JSON = "bad_json"
    BAD_TEXT = "bad_text"
    INVALID_FIELD = "invalid_field"
    IDENTITY_MISMATCH = "identity_mismatch"
    SUBJECT_MISMATCH = "subject_mismatch"
    POISON = "poison"
    INTERNAL_ERROR = "internal_error"
