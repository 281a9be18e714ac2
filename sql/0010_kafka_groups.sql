-- Consumer groups of Kafka clients (the kafka-api role): the coordinator's
-- state of Kafka's classic group protocol, in Postgres so that members
-- connected to different kafka-api processes are one group. A group is
-- either native or Kafka-protocol: a row here makes it a Kafka group.
--
-- Its members are also rows of group_members (host, client id, session,
-- heartbeat), and its committed offsets rows of group_partitions (owner:
-- the member the last assignment gave the partition to), so `groups
-- list|describe`, lag, the lag metrics, reset-offsets (refused while a
-- member is live) and delete treat both kinds alike.
CREATE TABLE kafka_groups (
    group_id           text        PRIMARY KEY,
    state              text        NOT NULL DEFAULT 'Empty'
                                   CHECK (state IN ('Empty', 'PreparingRebalance', 'CompletingRebalance', 'Stable')),
    generation         integer     NOT NULL DEFAULT 0,
    protocol_type      text,
    protocol_name      text,
    leader             text,
    -- While PreparingRebalance: when the rebalance completes without the
    -- members that have not rejoined (or, from Empty, when the first
    -- members' initial delay is over).
    rebalance_deadline timestamptz,
    initial_rebalance  boolean     NOT NULL DEFAULT false
);

CREATE TABLE kafka_group_members (
    group_id          text     NOT NULL,
    member_id         text     NOT NULL,
    -- group.instance.id: a static member (KIP-345).
    group_instance_id text,
    rebalance_timeout interval NOT NULL,
    -- The assignors the member offers, in its order of preference, and
    -- each one's subscription (opaque to the coordinator).
    protocol_names    text[]   NOT NULL,
    protocol_metadata bytea[]  NOT NULL,
    -- The generation it last joined for: below the group's next one while
    -- a rebalance waits for it.
    joined_generation integer  NOT NULL,
    -- What the leader assigned it (opaque), once synced.
    assignment        bytea,
    PRIMARY KEY (group_id, member_id),
    FOREIGN KEY (group_id, member_id) REFERENCES group_members (group_id, member_id) ON DELETE CASCADE,
    UNIQUE (group_id, group_instance_id)
);


-- Each running kafka-api process: where it listens and who is connected
-- (client id, software name and version from ApiVersions v3, user),
-- written every few seconds (`outbox-relay kafka-api status` reads it;
-- rows not seen for a while are processes gone).
CREATE TABLE kafka_api_listeners (
    id         text        PRIMARY KEY,
    listen     text        NOT NULL,
    advertised text        NOT NULL,
    tls        boolean     NOT NULL,
    sasl       boolean     NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now(),
    clients    jsonb       NOT NULL DEFAULT '[]'
);
