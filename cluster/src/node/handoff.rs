//! Moving a partition between owners (a cluster without replicas): fence, ship, commit
//! the move, and the install on the receiving side (module documentation of `node`).

use super::*;

impl ClusterNode {
    /// Hands `partition`, which this node owns, to `to`. Returns the map's epoch after
    /// the move.
    pub async fn hand_off(&self, partition: u16, to: NodeId) -> Result<u64, ClusterError> {
        // Runs to its end even if the caller stops waiting (an operator's Ctrl-C, a
        // proxy's timeout): a handoff cut short would leave the partition fenced.
        let node = self.clone();
        tokio::spawn(async move { node.hand_off_to_the_end(partition, to).await })
            .await
            .map_err(|e| ClusterError::Unavailable(format!("the handoff task failed: {e}")))?
    }

    pub(super) async fn hand_off_to_the_end(
        &self,
        partition: u16,
        to: NodeId,
    ) -> Result<u64, ClusterError> {
        let inner = &self.inner;
        let me = inner.me.node_id;
        let map = self.map();
        if map.is_replicated() {
            return Err(ClusterError::Conflict(
                "partitions of a replicated cluster do not move: their groups' replicas do".into(),
            ));
        }
        if partition >= map.partitions {
            return Err(ClusterError::BadRequest(format!(
                "partition {partition} does not exist"
            )));
        }
        if map.owner(partition) != Some(me) {
            return Err(ClusterError::Conflict(format!(
                "partition {partition} is not owned by {}",
                inner.me.name
            )));
        }
        let target = match map.members.get(&to) {
            Some(m) if m.status == MemberStatus::Active && to != me => m.clone(),
            Some(_) => {
                return Err(ClusterError::Conflict(format!(
                    "node {to} cannot take partitions"
                )))
            }
            None => return Err(ClusterError::NotFound(format!("node {to} is not a member"))),
        };
        if !lock(&inner.handing_off).insert(partition) {
            return Err(ClusterError::Conflict(format!(
                "partition {partition} is already moving"
            )));
        }
        let started = Instant::now();
        let outcome = self.move_out(partition, &target, map.epoch).await;
        if let Ok(epoch) = &outcome {
            lock(&inner.given_away).insert(partition, *epoch);
            // Until this node's map shows the move, a map from before it would say this
            // node still owns the partition: it stays marked as handed off until then.
            self.caught_up(*epoch).await;
        }
        let outcome = match outcome {
            Ok(epoch) => Ok(epoch),
            Err(MoveFailed {
                error,
                maybe_committed: false,
            }) => Err(error),
            Err(MoveFailed {
                error,
                maybe_committed: true,
            }) => {
                // Whether the map flipped is unknown: this node must not serve the
                // partition again on a map that may predate the flip. It stays fenced
                // (and marked as moving) until a barrier through consensus shows this
                // node every committed change; then the map decides.
                inner
                    .metrics
                    .handoff_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, to = %target.name, error = %error, "partition handoff outcome unknown; it stays fenced until the map settles");
                let node = self.clone();
                tokio::spawn(async move { node.settle(partition).await });
                return Err(error);
            }
        };
        lock(&inner.handing_off).remove(&partition);
        match &outcome {
            Ok(epoch) => {
                inner.metrics.handoffs.fetch_add(1, Ordering::Relaxed);
                inner
                    .metrics
                    .handoff_micros
                    .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
                tracing::info!(partition, to = %target.name, epoch, took = ?started.elapsed(), "partition handed over");
                // The new owner holds it durably: this copy is dead weight now.
                let _serial = inner.fence_lock.lock().await;
                if self.map().owner(partition) != Some(me)
                    && !inner.serving[usize::from(partition)].load(Ordering::Acquire)
                {
                    if let Err(e) = inner.shop.install_partition(partition, Vec::new()).await {
                        tracing::warn!(partition, error = %e, "could not drop the handed-over copy; it stays, unused");
                    }
                }
            }
            Err(e) => {
                inner
                    .metrics
                    .handoff_failures
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(partition, to = %target.name, error = %e, "partition handoff failed");
                // Serve it here again, unless the map already says otherwise (the
                // watcher then does what the map says).
                let _serial = inner.fence_lock.lock().await;
                let map = self.map();
                // A map turned replicated meanwhile: the partition's group serves it.
                if !map.is_replicated()
                    && map.owner(partition) == Some(me)
                    && !inner.serving[usize::from(partition)].load(Ordering::Acquire)
                    && inner.shop.unfence_partition(partition).await.is_ok()
                {
                    inner.serving[usize::from(partition)].store(true, Ordering::Release);
                }
            }
        }
        outcome
    }

    /// After a move whose commit is in doubt: waits until this node has applied
    /// everything consensus committed (a no-op change goes through and is applied here),
    /// then lets the map decide who serves the partition.
    pub(super) async fn settle(&self, partition: u16) {
        self.barrier().await;
        lock(&self.inner.handing_off).remove(&partition);
        self.reconcile().await;
    }

    /// Returns once this node has applied every map change committed before the call
    /// (a no-op change goes through consensus and is applied here). Retries for as long
    /// as consensus cannot be reached: what needs it must not act on a stale map.
    pub(super) async fn barrier(&self) {
        loop {
            match self.inner.control.propose(MapCommand::Barrier).await {
                Ok(map) => {
                    self.caught_up(map.epoch).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "waiting for consensus to confirm the map");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    pub(super) async fn move_out(
        &self,
        partition: u16,
        target: &Member,
        epoch: u64,
    ) -> Result<u64, MoveFailed> {
        let inner = &self.inner;
        {
            let _serial = inner.fence_lock.lock().await;
            inner.serving[usize::from(partition)].store(false, Ordering::Release);
            inner
                .shop
                .fence_partition(partition)
                .await
                .map_err(|e| MoveFailed::before(ClusterError::Unavailable(e.to_string())))?;
        }
        let entities = inner.shop.export_partition(partition).await.map_err(|e| {
            MoveFailed::before(ClusterError::Unavailable(format!(
                "exporting partition {partition}: {e}"
            )))
        })?;
        let frame = proto::encode(&Request::Install(Install {
            partition,
            epoch,
            entities,
        }));
        match inner
            .transport
            .call_for(&target.cluster_addr, frame, HANDOFF_CALL)
            .await
        {
            Ok(answer) => match proto::decode::<Response>(&answer) {
                Ok(Response::Installed) => {}
                Ok(Response::Error(e)) => {
                    return Err(MoveFailed::before(ClusterError::Unavailable(format!(
                        "{} refused the partition: {e}",
                        target.name
                    ))))
                }
                Ok(other) => {
                    return Err(MoveFailed::before(ClusterError::Unavailable(format!(
                        "unexpected answer to an install: {other:?}"
                    ))))
                }
                Err(e) => return Err(MoveFailed::before(ClusterError::Unavailable(e.to_string()))),
            },
            Err(e) => return Err(MoveFailed::before(ClusterError::Unavailable(e.to_string()))),
        }
        self.commit_move(partition, target.node_id)
            .await
            .map_err(|error| MoveFailed {
                // A refusal by the map is certain; anything else may have committed.
                maybe_committed: !matches!(error, ClusterError::Conflict(_)),
                error,
            })
    }

    /// Commits the map flip. `Move` is a compare-and-set on the owner, so trying again
    /// after an answer was lost is safe: finding the target already the owner means an
    /// earlier try committed.
    pub(super) async fn commit_move(
        &self,
        partition: u16,
        to: NodeId,
    ) -> Result<u64, ClusterError> {
        let me = self.inner.me.node_id;
        let deadline = Instant::now() + COMMIT_MOVE_FOR;
        let mut pause = Duration::from_millis(50);
        loop {
            let cmd = MapCommand::Move {
                partition,
                from: me,
                to,
            };
            match self.inner.control.propose(cmd).await {
                Ok(map) => return Ok(map.epoch),
                Err(ControlError::Map(MapError::NotOwner { owner, .. })) if owner == to => {
                    // An earlier try committed. Its epoch is not in the refusal: catch up
                    // with everything committed, which includes it.
                    self.barrier().await;
                    return Ok(self.map().epoch);
                }
                Err(ControlError::Map(e @ MapError::NotOwner { .. })) => {
                    // Someone else owns it at the leader: an earlier try (whose answer
                    // was lost) may have committed and the partition moved on since, or
                    // this node's map was stale. Either way this node must not serve it
                    // on its own map: the caller lets consensus settle it.
                    return Err(ClusterError::Unavailable(format!(
                        "the move of partition {partition} may have committed: {e}"
                    )));
                }
                Err(ControlError::Map(e)) => {
                    // The target cannot take it: certainly not moved.
                    return Err(ClusterError::Conflict(e.to_string()));
                }
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(partition, error = %e, "committing a partition move; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(e) => {
                    // The move may or may not have committed: the partition stays fenced
                    // here until the map says who owns it (the watcher unfences it if
                    // this node still does).
                    return Err(ClusterError::Unavailable(format!(
                        "the move of partition {partition} could not be committed: {e}"
                    )));
                }
            }
        }
    }

    /// Receives a partition: replaces this node's copy of it. It is served once the map
    /// says this node owns it.
    pub(super) async fn install(&self, install: Install) -> Result<(), ClusterError> {
        let inner = &self.inner;
        let p = install.partition;
        if p >= inner.shop.partitioner().count() {
            return Err(ClusterError::BadRequest(format!(
                "partition {p} does not exist"
            )));
        }
        let _serial = inner.fence_lock.lock().await;
        if inner.serving[usize::from(p)].load(Ordering::Acquire) {
            return Err(ClusterError::Conflict(format!(
                "partition {p} is served here already"
            )));
        }
        let count = install.entities.len();
        inner
            .shop
            .install_partition(p, install.entities)
            .await
            .map_err(|e| ClusterError::Unavailable(e.to_string()))?;
        tracing::info!(partition = p, entities = count, "partition installed");
        Ok(())
    }
}

/// Why a partition did not move, and whether the map may have flipped anyway.
pub(super) struct MoveFailed {
    pub(super) error: ClusterError,
    pub(super) maybe_committed: bool,
}

impl MoveFailed {
    /// Failed before the map flip was proposed: certainly not moved.
    pub(super) fn before(error: ClusterError) -> Self {
        MoveFailed {
            error,
            maybe_committed: false,
        }
    }
}
