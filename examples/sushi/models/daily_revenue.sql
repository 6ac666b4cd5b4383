MODEL (
  name sushi.daily_revenue,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column order_date,
    batch_size 7,
    lookback 1
  ),
  start '2024-01-01',
  end '2024-03-31',
  cron '@daily',
  grain order_date
);

SELECT
  o.order_date,
  SUM(o.quantity * p.price) AS revenue,
  COUNT(*) AS order_count
FROM sushi.orders AS o
JOIN sushi.item_prices AS p
  ON o.item_id = p.item_id
WHERE o.order_date BETWEEN @start_ds AND @end_ds
GROUP BY o.order_date
