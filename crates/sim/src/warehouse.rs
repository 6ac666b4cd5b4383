//! The modelled warehouse: what plain SQL would put in each table, cell by cell (a day of an
//! incremental table, the whole of a FULL one), the environment views, and the checks made at
//! the moment a write or a promotion happens.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sluice_core::interval::{Interval, Timestamp};
use sluice_core::model::SeedData;
use sluice_core::names::PhysicalTable;
use sluice_engine::{
    AuditCheck, Canceller, EngineError, GatewayPromotion, PromotionOutcome, TableChecksum, ViewUpdate, Warehouse,
    WarehouseFactory,
};
use sluice_state::{IntervalStore, RunStatus, RunStore};

use crate::world::{Shared, WHOLE, current_task, day_cells};

#[derive(Clone)]
pub struct SimWarehouses {
    world: Shared,
}

impl SimWarehouses {
    pub fn new(world: Shared) -> SimWarehouses {
        SimWarehouses { world }
    }
}

#[async_trait]
impl WarehouseFactory for SimWarehouses {
    async fn connect(&self, gateway: &str) -> Result<Box<dyn Warehouse>, EngineError> {
        self.world.pause().await;
        if failed(&self.world) {
            return Err(unavailable());
        }
        Ok(Box::new(SimConnection { world: self.world.clone(), gateway: gateway.to_string() }))
    }
}

#[async_trait]
impl sluice_coordinator::GatewayCheck for SimWarehouses {
    async fn check(&self, _gateway: &str) -> Result<(), String> {
        Ok(())
    }

    /// The simulated projects have no `before_all`: asked to run statements, the simulation
    /// says so rather than pretending.
    async fn run_statements(&self, gateway: &str, _statements: &[String]) -> Result<(), String> {
        Err(format!("the simulated gateway {gateway} runs no before_all statements"))
    }
}

fn failed(world: &Shared) -> bool {
    let mut world = world.lock();
    let rate = world.faults.warehouse_fails;
    world.chance(rate)
}

fn unavailable() -> EngineError {
    EngineError::Unavailable { engine: "sim", message: "injected fault".into() }
}

struct NoCanceller;

#[async_trait]
impl Canceller for NoCanceller {
    async fn cancel(&self) {}
}

struct SimConnection {
    world: Shared,
    gateway: String,
}

impl SimConnection {
    /// A poisoned table's write fails with an SQL error; a crashing one's brings the slot down.
    fn poison(&self, table: &str) -> Result<(), EngineError> {
        let (poisoned, crashes) = match self.world.lock().registry.get(table) {
            Some(info) => (info.poisoned, info.crashes),
            None => (false, false),
        };
        if crashes {
            self.world.note(&format!("a write to {table} crashes its worker slot"));
            std::panic::panic_any(crate::world::SimulatedCrash);
        }
        if poisoned {
            return Err(EngineError::Statement { engine: "sim", code: None, message: "poisoned model".into() });
        }
        Ok(())
    }

    /// The checks at the start of a data write, against state as it is.
    async fn check_write(&self, table: &str, interval: Option<Interval>) {
        let (truth, info) = {
            let world = self.world.lock();
            (world.truth.clone(), world.registry.get(table).cloned())
        };
        let Some(info) = info else {
            self.world.lock().violation(format!("write to {table}, which no plan created"));
            return;
        };
        if info.gateway != self.gateway {
            self.world
                .lock()
                .violation(format!("a worker of gateway {} wrote {table} of gateway {}", self.gateway, info.gateway));
        }
        // What this worker slot last read before writing: the moments its decision was taken on.
        let (reads, now) = {
            let mut world = self.world.lock();
            (world.reads.get(&current_task()).copied().unwrap_or_default(), world.tick())
        };
        // A run planning this table must have been running when the slot last read its run, and
        // its plan's breaker closed when the slot last read the breaker.
        let run_read = reads.run.unwrap_or(now);
        let breaker_read = reads.breaker.unwrap_or(now);
        let mut decided_live = false;
        for plan_id in info.planned.keys() {
            let tripped = self.world.lock().tripped_at.get(plan_id).copied();
            if tripped.is_some_and(|tripped| tripped < breaker_read) {
                continue;
            }
            for run in truth.runs_of_plan(plan_id).await.unwrap_or_default() {
                let ended = self.world.lock().ended_at.get(&run.id).copied();
                let running_when_read = match ended {
                    Some(ended) => ended > run_read,
                    None => run.status == RunStatus::Running,
                };
                decided_live |= running_when_read;
            }
        }
        if !decided_live {
            self.world.lock().violation(format!("write to {table} while no running, unaborted run plans it"));
        }
        // The interval must not have been recorded when the slot last read the table's intervals
        // (or at all, if it never read them).
        if let Some(interval) = interval {
            let recorded = truth.get_intervals(std::slice::from_ref(&info.key)).await.unwrap_or_default();
            let covered = recorded.get(&info.key).is_some_and(|set| set.covers(interval));
            if covered {
                let mut world = self.world.lock();
                let (model, version) = info.key.clone();
                let since = world.recorded_at.get(&(model, version, interval.start.0)).copied();
                let decided_unaware = match (since, reads.intervals) {
                    (Some(since), Some(read)) => since > read,
                    _ => false,
                };
                if !decided_unaware {
                    world.violation(format!("{table} {interval} executed again after it was recorded"));
                }
            }
        }
    }

    /// Every table a view is pointed at must be complete for some plan that writes it.
    async fn check_targets(&self, updates: &[ViewUpdate]) {
        let truth = self.world.lock().truth.clone();
        for update in updates {
            let Some(target) = &update.target else { continue };
            let name = target.to_string();
            let info = self.world.lock().registry.get(&name).cloned();
            let Some(info) = info else { continue };
            let recorded = truth.get_intervals(std::slice::from_ref(&info.key)).await.unwrap_or_default();
            let have = recorded.get(&info.key).cloned().unwrap_or_default();
            let complete =
                info.planned.values().any(|planned| planned.ranges().iter().all(|range| have.covers(*range)));
            if !complete {
                self.world.lock().violation(format!(
                    "view {}.{} pointed at {name}, whose planned intervals are not all recorded",
                    update.schema, update.name
                ));
            }
        }
    }

    fn write_cells(&self, table: &str, cells: Vec<(i64, Interval)>) {
        let mut world = self.world.lock();
        let values: Vec<(i64, u64)> =
            cells.iter().map(|(cell, span)| (*cell, world.actual_cell(table, *cell, *span))).collect();
        world.note(&format!("write {table} {} cells", values.len()));
        let stored = world.tables.entry(table.to_string()).or_default();
        if cells.first().is_some_and(|(cell, _)| *cell == WHOLE) {
            stored.cells.clear();
        }
        for (cell, value) in values {
            stored.cells.insert(cell, value);
        }
    }
}

/// Applies view updates to the modelled warehouse.
fn apply_views(world: &mut crate::world::World, gateway: &str, updates: &[ViewUpdate]) {
    world.note(&format!("promote {} views on {gateway}", updates.len()));
    for update in updates {
        let key = (gateway.to_string(), update.schema.clone(), update.name.clone());
        match &update.target {
            Some(target) => {
                world.views.insert(key, target.to_string());
            }
            None => {
                world.views.remove(&key);
            }
        }
    }
}

#[async_trait]
impl Warehouse for SimConnection {
    fn engine_name(&self) -> &'static str {
        "sim"
    }

    async fn ping(&mut self) -> Result<(), EngineError> {
        Ok(())
    }

    fn canceller(&self) -> Arc<dyn Canceller> {
        Arc::new(NoCanceller)
    }

    async fn execute(&mut self, _sql: &str) -> Result<(), EngineError> {
        self.world.pause().await;
        Ok(())
    }

    async fn ensure_table(
        &mut self,
        table: &PhysicalTable,
        _columns: &[(String, String)],
        _query: &str,
    ) -> Result<(), EngineError> {
        self.world.pause().await;
        if failed(&self.world) {
            return Err(unavailable());
        }
        self.world.lock().tables.entry(table.to_string()).or_default();
        Ok(())
    }

    async fn replace_interval(
        &mut self,
        table: &PhysicalTable,
        _time_column: sluice_engine::TimeColumn<'_>,
        interval: Interval,
        _query: &str,
        _checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let name = table.to_string();
        self.world.pause().await;
        if failed(&self.world) {
            return Err(unavailable());
        }
        self.poison(&name)?;
        self.check_write(&name, Some(interval)).await;
        let cells = day_cells(interval);
        let rows = cells.len() as u64;
        // The statement runs; its transaction commits at the end.
        self.world.pause().await;
        self.write_cells(&name, cells);
        Ok(rows)
    }

    async fn replace_all(
        &mut self,
        table: &PhysicalTable,
        _query: &str,
        _checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        let name = table.to_string();
        self.world.pause().await;
        if failed(&self.world) {
            return Err(unavailable());
        }
        self.poison(&name)?;
        self.check_write(&name, None).await;
        let span = {
            let world = self.world.lock();
            world
                .registry
                .get(&name)
                .and_then(|info| info.planned.values().next().and_then(|set| set.ranges().first().copied()))
        };
        let span = span
            .unwrap_or(Interval::new(crate::project::START, Timestamp(crate::project::START.0 + crate::world::DAY)));
        self.world.pause().await;
        self.write_cells(&name, vec![(WHOLE, span)]);
        Ok(1)
    }

    async fn rebuild(
        &mut self,
        table: &PhysicalTable,
        _query: &str,
        _checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("rebuild of {table}") })
    }

    async fn table_columns(&mut self, table: &PhysicalTable) -> Result<Vec<(String, String)>, EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("the columns of {table}") })
    }

    async fn append(
        &mut self,
        table: &PhysicalTable,
        _query: &str,
        _checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("append into {table}") })
    }

    async fn upsert(
        &mut self,
        table: &PhysicalTable,
        _unique_key: &[String],
        _query: &str,
        _checks: &[AuditCheck],
    ) -> Result<u64, EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("upsert into {table}") })
    }

    async fn load_seed(
        &mut self,
        table: &PhysicalTable,
        _columns: &[(String, String)],
        _seed: &SeedData,
    ) -> Result<u64, EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("seed {table}") })
    }

    async fn create_physical_view(&mut self, view: &PhysicalTable, _query: &str) -> Result<(), EngineError> {
        Err(EngineError::Unsupported { gateway: self.gateway.clone(), what: format!("view {view}") })
    }

    async fn promote(&mut self, updates: &[ViewUpdate]) -> Result<(), EngineError> {
        self.world.pause().await;
        if failed(&self.world) {
            return Err(unavailable());
        }
        self.check_targets(updates).await;
        // One transaction: every view changes at once, at commit.
        self.world.pause().await;
        apply_views(&mut self.world.lock(), &self.gateway, updates);
        Ok(())
    }

    async fn promote_environment(&mut self, promotion: &GatewayPromotion) -> Result<PromotionOutcome, EngineError> {
        self.world.pause().await;
        let stall = {
            let mut world = self.world.lock();
            let stalls = world.faults.promotion_stalls;
            if world.chance(stalls) { Some(Duration::from_millis(world.below(120_000))) } else { None }
        };
        if let Some(stall) = stall {
            self.world.note(&format!("promotion of {} on {} stalls {stall:?}", promotion.environment, self.gateway));
            tokio::time::sleep(stall).await;
        }
        if failed(&self.world) {
            return Err(unavailable());
        }
        // One transaction: the marker read, the views and the marker written, with no await
        // that could let anything in between.
        let key = (self.gateway.clone(), promotion.environment.clone());
        let shown = self.world.lock().markers.get(&key).cloned();
        let outcome = PromotionOutcome::decide(shown.as_deref(), promotion);
        if outcome == PromotionOutcome::Applied {
            self.check_targets(&promotion.updates).await;
            let mut world = self.world.lock();
            apply_views(&mut world, &self.gateway, &promotion.updates);
            match &promotion.plan {
                Some(plan) => world.markers.insert(key, plan.clone()),
                None => world.markers.remove(&key),
            };
        }
        self.world.note(&format!("promotion of {} on {}: {outcome:?}", promotion.environment, self.gateway));
        self.world.pause().await;
        Ok(outcome)
    }

    async fn shown_plan(&mut self, environment: &str) -> Result<Option<String>, EngineError> {
        self.world.pause().await;
        Ok(self.world.lock().markers.get(&(self.gateway.clone(), environment.to_string())).cloned())
    }

    async fn drop_table(&mut self, table: &PhysicalTable) -> Result<(), EngineError> {
        self.world.pause().await;
        let mut world = self.world.lock();
        let name = table.to_string();
        world.note(&format!("drop {name}"));
        if world.views.values().any(|target| *target == name) {
            world.violation(format!("{name} dropped while a view selects from it"));
        }
        world.tables.remove(&name);
        world.dropped.insert(name);
        Ok(())
    }

    async fn checksum(&mut self, _schema: &str, _name: &str) -> Result<TableChecksum, EngineError> {
        Ok(TableChecksum { rows: 0, checksum: String::new() })
    }

    async fn query_i64(&mut self, _sql: &str) -> Result<Option<i64>, EngineError> {
        Ok(None)
    }

    async fn view_target(&mut self, schema: &str, name: &str) -> Result<Option<String>, EngineError> {
        let world = self.world.lock();
        Ok(world.views.get(&(self.gateway.clone(), schema.to_string(), name.to_string())).cloned())
    }
}
