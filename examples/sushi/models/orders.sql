MODEL (
  name sushi.orders,
  kind INCREMENTAL_BY_TIME_RANGE (
    time_column order_date,
    batch_size 1
  ),
  start '2024-01-01',
  end '2024-03-31',
  cron '@daily',
  grain order_id,
  owner 'data-eng',
  description 'Synthetic orders, a fixed number a day',
  columns (order_id BIGINT, customer_id INT, item_id INT, quantity INT, order_date DATE)
);

@DEF(orders_per_day, @VAR('orders_per_day'));

SELECT
  CAST(EXTRACT(epoch FROM d.order_day) / 86400 AS BIGINT) * 1000 + g.n AS order_id,
  CAST(g.n % 7 AS INT) + 1 AS customer_id,
  CAST((g.n * 3) % 5 AS INT) + 1 AS item_id,
  CAST(g.n % 4 AS INT) + 1 AS quantity,
  CAST(d.order_day AS DATE) AS order_date
FROM generate_series(CAST(@start_ds AS TIMESTAMP), CAST(@end_ds AS TIMESTAMP), INTERVAL '1 day') AS d(order_day)
CROSS JOIN generate_series(0, @orders_per_day - 1) AS g(n)
